//! The Storage Write API calls tenantsync makes, through gcp-bigquery-client's generated gRPC
//! stubs on a channel of our own (the crate's `StorageApi` connects only to Google's endpoint;
//! tests write to the local BigQuery's gRPC port). The tenant's token goes with every call as
//! request metadata, so one channel serves every tenant of a process.

use crate::auth::TokenSource;
use crate::error::BqError;
pub(crate) use gcp_bigquery_client::google::cloud::bigquery::storage::v1 as pb;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use pb::append_rows_request::{ProtoData, Rows};
use pb::big_query_write_client::BigQueryWriteClient;
use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Code, Request, Status};

pub use pb::AppendRowsResponse;

/// Google's Storage Write endpoint.
pub const GOOGLE_STORAGE_URL: &str = "https://bigquerystorage.googleapis.com";

/// CreateWriteStream calls per second per process: Google advises staying under about 40–50
/// a second per project, and a process may serve many slices of one project at once. An
/// in-process limit is enough: every pending stream is created by the process that writes it.
const CREATE_STREAMS_PER_SECOND: u32 = 40;

static CREATE_STREAM_LIMIT: LazyLock<DefaultDirectRateLimiter> = LazyLock::new(|| {
    RateLimiter::direct(Quota::per_second(
        NonZeroU32::new(CREATE_STREAMS_PER_SECOND).expect("non-zero"),
    ))
});

/// A channel to a Storage Write endpoint (`http://host:port` for the local BigQuery,
/// `https://…` for Google). Connects on first use.
pub fn channel(url: &str, timeout: Duration) -> Result<Channel, BqError> {
    let bad = |e: tonic::transport::Error| BqError::Invalid(format!("storage endpoint {url}: {e}"));
    let mut ep = Channel::from_shared(url.to_string())
        .map_err(|e| BqError::Invalid(format!("storage endpoint {url}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        ep = ep
            .tls_config(ClientTlsConfig::new().with_native_roots())
            .map_err(bad)?;
    }
    Ok(ep.connect_lazy())
}

/// One tenant's use of a channel: its token on every call.
#[derive(Clone)]
pub struct WriteClient {
    client: BigQueryWriteClient<Channel>,
    tokens: TokenSource,
}

/// What an append answered, once the gRPC status and the response's own error are read.
#[derive(Debug)]
pub enum Appended {
    /// Written; for created streams, at this offset.
    Ok,
    /// The offset is already written: an earlier attempt whose answer was lost wrote it.
    AlreadyWritten,
    /// Rows refused (none written), by index.
    RowErrors(Vec<pb::RowError>),
}

impl WriteClient {
    pub(crate) fn new(channel: Channel, tokens: TokenSource) -> Self {
        Self {
            // Appends carry up to 10 MB; tonic's 4 MB default would refuse big answers too.
            client: BigQueryWriteClient::new(channel)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
            tokens,
        }
    }

    /// `message` with the tenant's token, and the routing header Google's frontends expect.
    async fn request<T>(&self, message: T, routing: &str) -> Result<Request<T>, BqError> {
        let token = self.tokens.token().await?;
        let mut r = Request::new(message);
        let bearer = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| BqError::CredentialsRejected("access token is not valid ASCII".into()))?;
        r.metadata_mut().insert("authorization", bearer);
        if let Ok(v) = MetadataValue::try_from(routing) {
            r.metadata_mut().insert("x-goog-request-params", v);
        }
        Ok(r)
    }

    /// A new pending stream on `table_path` (`projects/…/datasets/…/tables/…`).
    pub async fn create_pending(&self, table_path: &str) -> Result<String, BqError> {
        CREATE_STREAM_LIMIT.until_ready().await;
        let msg = pb::CreateWriteStreamRequest {
            parent: table_path.to_string(),
            write_stream: Some(pb::WriteStream {
                r#type: pb::write_stream::Type::Pending as i32,
                ..Default::default()
            }),
        };
        let req = self.request(msg, &format!("parent={table_path}")).await?;
        let s = self.client.clone().create_write_stream(req).await;
        Ok(s.map_err(|e| classify(&e))?.into_inner().name)
    }

    /// One AppendRows request on its own call: `rows` (encoded messages of `descriptor`) at
    /// `offset` (None on the default stream).
    pub async fn append(
        &self,
        stream: &str,
        offset: Option<i64>,
        descriptor: &prost_types::DescriptorProto,
        rows: Vec<Vec<u8>>,
    ) -> Result<Appended, BqError> {
        let msg = pb::AppendRowsRequest {
            write_stream: stream.to_string(),
            offset,
            rows: Some(Rows::ProtoRows(ProtoData {
                writer_schema: Some(pb::ProtoSchema {
                    proto_descriptor: Some(descriptor.clone()),
                }),
                rows: Some(pb::ProtoRows {
                    serialized_rows: rows,
                }),
            })),
            ..Default::default()
        };
        let req = self
            .request(tokio_stream::once(msg), &format!("write_stream={stream}"))
            .await?;
        let mut answers = self
            .client
            .clone()
            .append_rows(req)
            .await
            .map_err(|e| classify(&e))?
            .into_inner();
        let answer = answers
            .message()
            .await
            .map_err(|e| classify(&e))?
            .ok_or_else(|| BqError::Transient("AppendRows closed without an answer".into()))?;
        appended(answer)
    }

    /// Finalize a pending stream: no more appends. Returns its row count.
    pub async fn finalize(&self, stream: &str) -> Result<i64, BqError> {
        let msg = pb::FinalizeWriteStreamRequest {
            name: stream.to_string(),
        };
        let req = self.request(msg, &format!("name={stream}")).await?;
        let r = self.client.clone().finalize_write_stream(req).await;
        Ok(r.map_err(|e| classify(&e))?.into_inner().row_count)
    }

    /// Commit finalized pending streams of one table at once: the moment their rows appear.
    pub async fn commit(&self, table_path: &str, streams: Vec<String>) -> Result<(), BqError> {
        let msg = pb::BatchCommitWriteStreamsRequest {
            parent: table_path.to_string(),
            write_streams: streams,
        };
        let req = self.request(msg, &format!("parent={table_path}")).await?;
        let r = self.client.clone().batch_commit_write_streams(req).await;
        let r = r.map_err(|e| classify(&e))?.into_inner();
        match (r.stream_errors.first(), r.commit_time) {
            (None, Some(_)) => Ok(()),
            (Some(e), _) => Err(BqError::Invalid(format!(
                "commit of {} refused: {}",
                e.entity, e.error_message
            ))),
            (None, None) => Err(BqError::Transient("commit answered no commit time".into())),
        }
    }
}

impl WriteClient {
    /// Whether every stream of `streams` reports a commit time (a commit whose answer was
    /// lost). Any failure to ask counts as no.
    pub async fn all_committed(&self, streams: &[String]) -> bool {
        for name in streams {
            let msg = pb::GetWriteStreamRequest {
                name: name.clone(),
                ..Default::default()
            };
            let Ok(req) = self.request(msg, &format!("name={name}")).await else {
                return false;
            };
            match self.client.clone().get_write_stream(req).await {
                Ok(s) if s.get_ref().commit_time.is_some() => {}
                _ => return false,
            }
        }
        true
    }
}

/// An append's answer: its own error status (the server answers offsets and refused rows in
/// the response, not as the call's status), its row errors, or its result.
fn appended(a: AppendRowsResponse) -> Result<Appended, BqError> {
    use pb::append_rows_response::Response;
    match a.response {
        Some(Response::Error(s)) => {
            let code = Code::from_i32(s.code);
            if code == Code::AlreadyExists {
                Ok(Appended::AlreadyWritten)
            } else if !a.row_errors.is_empty() {
                Ok(Appended::RowErrors(a.row_errors))
            } else {
                Err(classify(&Status::new(code, s.message)))
            }
        }
        _ if !a.row_errors.is_empty() => Ok(Appended::RowErrors(a.row_errors)),
        Some(Response::AppendResult(_)) => Ok(Appended::Ok),
        None => Err(BqError::Transient("AppendRows answered nothing".into())),
    }
}

/// A gRPC status as the rest of tenantsync classifies BigQuery errors.
pub fn classify(s: &Status) -> BqError {
    let text = format!("gRPC {:?}: {}", s.code(), s.message());
    match s.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled => BqError::Transient(text),
        Code::ResourceExhausted => BqError::RateLimited(text),
        Code::PermissionDenied | Code::Unauthenticated => BqError::CredentialsRejected(text),
        Code::NotFound => BqError::NotFound(text),
        Code::AlreadyExists => BqError::AlreadyExists(text),
        Code::InvalidArgument if is_too_large(s.message()) => BqError::TooLarge(text),
        _ => BqError::Invalid(text),
    }
}

fn is_too_large(m: &str) -> bool {
    let m = m.to_ascii_lowercase();
    m.contains("too large") || m.contains("exceeds") && m.contains("size")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Retry;

    #[test]
    fn statuses_classify_as_their_http_twins() {
        let r = |c: Code, m: &str| classify(&Status::new(c, m)).retry();
        assert_eq!(
            r(Code::Unavailable, ""),
            Retry::After(Duration::from_millis(500))
        );
        assert_eq!(
            r(Code::ResourceExhausted, ""),
            Retry::After(Duration::from_secs(2))
        );
        assert_eq!(r(Code::Unauthenticated, ""), Retry::PauseTenant);
        assert_eq!(r(Code::PermissionDenied, ""), Retry::PauseTenant);
        assert_eq!(r(Code::NotFound, ""), Retry::AfterFix);
        assert_eq!(
            r(Code::InvalidArgument, "request too large"),
            Retry::AfterFix
        );
        assert_eq!(r(Code::InvalidArgument, "bad"), Retry::Never);
        assert_eq!(r(Code::OutOfRange, "beyond"), Retry::Never);
    }

    #[test]
    fn an_answer_at_a_written_offset_is_already_written() {
        use pb::append_rows_response::Response;
        let status = |code: Code| gcp_bigquery_client::google::rpc::Status {
            code: code as i32,
            message: "m".into(),
            details: vec![],
        };
        let answer = |r: Response, row_errors| AppendRowsResponse {
            response: Some(r),
            row_errors,
            ..Default::default()
        };
        let ok = appended(answer(Response::AppendResult(Default::default()), vec![]));
        assert!(matches!(ok, Ok(Appended::Ok)));
        let dup = appended(answer(Response::Error(status(Code::AlreadyExists)), vec![]));
        assert!(matches!(dup, Ok(Appended::AlreadyWritten)));
        let oor = appended(answer(Response::Error(status(Code::OutOfRange)), vec![]));
        assert!(matches!(oor, Err(BqError::Invalid(_))));
        let rows = vec![pb::RowError {
            index: 3,
            code: 1,
            message: "bad".into(),
        }];
        let bad = appended(answer(Response::Error(status(Code::InvalidArgument)), rows));
        assert!(matches!(bad, Ok(Appended::RowErrors(e)) if e[0].index == 3));
    }
}
