//! A zero-cost Storage Write API for benchmarks: the gRPC twin of [`crate::sink`]. A real
//! `google.cloud.bigquery.storage.v1.BigQueryWrite` server on loopback (HTTP/2, tonic, prost
//! decoding of every request), which decodes every serialized row with the descriptor its
//! request carries (a walk of the protobuf wire format, field by field, checking each field's
//! number, wire type and UTF-8 against the `DescriptorProto`), keeps pending streams' offsets
//! and states, and stores nothing.
//!
//! Calls: CreateWriteStream (pending or committed streams, named `<table>/streams/<n>`),
//! AppendRows (offsets checked as BigQuery does: an offset already written answers
//! `ALREADY_EXISTS`, one beyond the end `OUT_OF_RANGE`; rows that do not decode answer
//! `INVALID_ARGUMENT` with their row errors), FinalizeWriteStream (row count),
//! BatchCommitWriteStreams (commit time, or a stream error for a stream not finalized) and
//! GetWriteStream (commit time once committed). Tables are not checked (the HTTP sink has them)
//! and tokens are not read.
//!
//! gcp-bigquery-client generates client stubs only, so the server is written on tonic's
//! low-level server API: a `tower::Service` routing by path to [`tonic::server::Grpc`].

use gcp_bigquery_client::google::cloud::bigquery::storage::v1 as pb;
use gcp_bigquery_client::google::rpc::Status as RpcStatus;
use pb::append_rows_request::Rows;
use pb::append_rows_response::{AppendResult, Response as AppendResponse};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, Timestamp};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status, Streaming};

/// What the sink has seen since it started or was last reset.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcSinkStats {
    /// AppendRows requests (messages on the bidi streams), and the rows they carried.
    pub appends: u64,
    pub rows: u64,
    /// Bytes of serialized rows decoded (what the Storage Write API bills).
    pub row_bytes: u64,
    /// Fields decoded in those rows.
    pub fields: u64,
    /// Rows that did not decode with their descriptor, and appends refused for their offset.
    pub bad_rows: u64,
    pub offset_refusals: u64,
    pub streams_created: u64,
    pub finalized: u64,
    pub commits: u64,
    pub committed_rows: u64,
    /// First and last append acknowledgement.
    pub first_ack: Option<Instant>,
    pub last_ack: Option<Instant>,
}

#[derive(Debug, Default)]
struct Stream {
    pending: bool,
    rows: i64,
    finalized: bool,
    committed: Option<Timestamp>,
}

#[derive(Default)]
struct State {
    appends: AtomicU64,
    rows: AtomicU64,
    row_bytes: AtomicU64,
    fields: AtomicU64,
    bad_rows: AtomicU64,
    offset_refusals: AtomicU64,
    created: AtomicU64,
    finalized: AtomicU64,
    commits: AtomicU64,
    committed_rows: AtomicU64,
    next_stream: AtomicU64,
    window: Mutex<(Option<Instant>, Option<Instant>)>,
    streams: Mutex<HashMap<String, Stream>>,
}

pub struct GrpcSink {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcSink {
    /// Serve on an ephemeral loopback port.
    pub async fn start() -> Self {
        let state = Arc::new(State::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gRPC sink");
        let addr = listener.local_addr().expect("gRPC sink address");
        let service = WriteService(state.clone());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = r {
                eprintln!("gRPC sink stopped: {e}");
            }
        });
        Self { addr, state, task }
    }

    /// `127.0.0.1:port`, for `Endpoint::with_storage_emulator` and
    /// `BIGQUERY_STORAGE_EMULATOR_HOST`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn stats(&self) -> GrpcSinkStats {
        let s = &self.state;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (first_ack, last_ack) = *s.window.lock().unwrap();
        GrpcSinkStats {
            appends: l(&s.appends),
            rows: l(&s.rows),
            row_bytes: l(&s.row_bytes),
            fields: l(&s.fields),
            bad_rows: l(&s.bad_rows),
            offset_refusals: l(&s.offset_refusals),
            streams_created: l(&s.created),
            finalized: l(&s.finalized),
            commits: l(&s.commits),
            committed_rows: l(&s.committed_rows),
            first_ack,
            last_ack,
        }
    }

    /// Zero the counters and forget the streams.
    pub fn reset(&self) {
        let s = &self.state;
        for c in [
            &s.appends,
            &s.rows,
            &s.row_bytes,
            &s.fields,
            &s.bad_rows,
            &s.offset_refusals,
            &s.created,
            &s.finalized,
            &s.commits,
            &s.committed_rows,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        *s.window.lock().unwrap() = (None, None);
        s.streams.lock().unwrap().clear();
    }
}

fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The BigQueryWrite service: routes each call by its path.
#[derive(Clone)]
struct WriteService(Arc<State>);

impl tonic::server::NamedService for WriteService {
    const NAME: &'static str = "google.cloud.bigquery.storage.v1.BigQueryWrite";
}

/// A handler as a tower service, the shape `Grpc::unary` takes.
fn unary<Q, A, F>(
    state: &Arc<State>,
    f: F,
) -> impl tower::Service<
    Request<Q>,
    Response = Response<A>,
    Error = Status,
    Future = BoxFuture<Result<Response<A>, Status>>,
> + Clone
       + Send
where
    Q: Send + 'static,
    A: Send + 'static,
    F: Fn(&State, Q) -> Result<A, Status> + Clone + Send + Sync + 'static,
{
    let state = state.clone();
    tower::service_fn(move |r: Request<Q>| {
        let state = state.clone();
        let f = f.clone();
        Box::pin(async move { f(&state, r.into_inner()).map(Response::new) })
            as BoxFuture<Result<Response<A>, Status>>
    })
}

const MAX_MESSAGE: usize = 32 << 20;

impl tower::Service<http::Request<tonic::body::Body>> for WriteService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let s = self.0.clone();
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        Box::pin(async move {
            macro_rules! grpc {
                ($q:ty, $a:ty) => {
                    tonic::server::Grpc::new(tonic_prost::ProstCodec::<$a, $q>::default())
                        .max_decoding_message_size(MAX_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE)
                };
            }
            let res = match method.as_str() {
                "CreateWriteStream" => {
                    grpc!(pb::CreateWriteStreamRequest, pb::WriteStream)
                        .unary(unary(&s, create_write_stream), req)
                        .await
                }
                "AppendRows" => {
                    let svc = tower::service_fn(
                        move |r: Request<Streaming<pb::AppendRowsRequest>>| {
                            let s = s.clone();
                            async move { Ok::<_, Status>(Response::new(append_rows(s, r.into_inner()))) }
                        },
                    );
                    grpc!(pb::AppendRowsRequest, pb::AppendRowsResponse)
                        .streaming(svc, req)
                        .await
                }
                "FinalizeWriteStream" => {
                    grpc!(
                        pb::FinalizeWriteStreamRequest,
                        pb::FinalizeWriteStreamResponse
                    )
                    .unary(unary(&s, finalize_write_stream), req)
                    .await
                }
                "BatchCommitWriteStreams" => {
                    grpc!(
                        pb::BatchCommitWriteStreamsRequest,
                        pb::BatchCommitWriteStreamsResponse
                    )
                    .unary(unary(&s, batch_commit), req)
                    .await
                }
                "GetWriteStream" => {
                    grpc!(pb::GetWriteStreamRequest, pb::WriteStream)
                        .unary(unary(&s, get_write_stream), req)
                        .await
                }
                other => Status::unimplemented(format!("gRPC sink: no method {other}")).into_http(),
            };
            Ok(res)
        })
    }
}

fn create_write_stream(
    s: &State,
    q: pb::CreateWriteStreamRequest,
) -> Result<pb::WriteStream, Status> {
    let ws = q.write_stream.unwrap_or_default();
    let kind = pb::write_stream::Type::try_from(ws.r#type).unwrap_or_default();
    let pending = match kind {
        pb::write_stream::Type::Pending => true,
        pb::write_stream::Type::Committed => false,
        other => {
            return Err(Status::invalid_argument(format!(
                "gRPC sink: stream type {other:?} is not modelled"
            )))
        }
    };
    if q.parent.split('/').count() != 6 {
        return Err(Status::invalid_argument(format!(
            "bad parent {:?}",
            q.parent
        )));
    }
    let n = s.next_stream.fetch_add(1, Ordering::Relaxed);
    let name = format!("{}/streams/s{n}", q.parent);
    s.streams.lock().unwrap().insert(
        name.clone(),
        Stream {
            pending,
            ..Default::default()
        },
    );
    s.created.fetch_add(1, Ordering::Relaxed);
    Ok(pb::WriteStream {
        name,
        r#type: kind as i32,
        create_time: Some(now()),
        ..Default::default()
    })
}

fn finalize_write_stream(
    s: &State,
    q: pb::FinalizeWriteStreamRequest,
) -> Result<pb::FinalizeWriteStreamResponse, Status> {
    let mut streams = s.streams.lock().unwrap();
    let st = streams
        .get_mut(&q.name)
        .ok_or_else(|| Status::not_found(format!("stream {} not found", q.name)))?;
    st.finalized = true;
    s.finalized.fetch_add(1, Ordering::Relaxed);
    Ok(pb::FinalizeWriteStreamResponse { row_count: st.rows })
}

fn batch_commit(
    s: &State,
    q: pb::BatchCommitWriteStreamsRequest,
) -> Result<pb::BatchCommitWriteStreamsResponse, Status> {
    use pb::storage_error::StorageErrorCode as E;
    let mut streams = s.streams.lock().unwrap();
    let mut errors = Vec::new();
    for name in &q.write_streams {
        let err = |code: E, m: &str| pb::StorageError {
            code: code as i32,
            entity: name.clone(),
            error_message: m.into(),
        };
        let of_table = name.starts_with(&format!("{}/", q.parent));
        match streams.get(name) {
            None => errors.push(err(E::StreamNotFound, "stream not found")),
            Some(_) if !of_table => errors.push(err(E::InvalidStreamState, "another table's")),
            Some(st) if !st.pending => errors.push(err(E::InvalidStreamType, "not pending")),
            Some(st) if !st.finalized => errors.push(err(E::InvalidStreamState, "not finalized")),
            Some(st) if st.committed.is_some() => {
                errors.push(err(E::StreamAlreadyCommitted, "already committed"))
            }
            Some(_) => {}
        }
    }
    if !errors.is_empty() {
        return Ok(pb::BatchCommitWriteStreamsResponse {
            commit_time: None,
            stream_errors: errors,
        });
    }
    let t = now();
    for name in &q.write_streams {
        let st = streams.get_mut(name).expect("checked above");
        st.committed = Some(t);
        s.committed_rows
            .fetch_add(st.rows as u64, Ordering::Relaxed);
    }
    s.commits.fetch_add(1, Ordering::Relaxed);
    Ok(pb::BatchCommitWriteStreamsResponse {
        commit_time: Some(t),
        stream_errors: vec![],
    })
}

fn get_write_stream(s: &State, q: pb::GetWriteStreamRequest) -> Result<pb::WriteStream, Status> {
    let streams = s.streams.lock().unwrap();
    let st = streams
        .get(&q.name)
        .ok_or_else(|| Status::not_found(format!("stream {} not found", q.name)))?;
    Ok(pb::WriteStream {
        name: q.name.clone(),
        r#type: if st.pending {
            pb::write_stream::Type::Pending
        } else {
            pb::write_stream::Type::Committed
        } as i32,
        commit_time: st.committed,
        ..Default::default()
    })
}

/// AppendRows: one answer per request, in order. The writer schema comes with the first
/// request of a call and may be left out of later ones.
fn append_rows(
    s: Arc<State>,
    mut requests: Streaming<pb::AppendRowsRequest>,
) -> Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AppendRowsResponse, Status>> + Send>> {
    Box::pin(async_stream(move |tx| async move {
        let mut schema: Option<Decoder> = None;
        let mut stream_name = String::new();
        while let Some(req) = requests.next().await {
            let req = match req {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if !req.write_stream.is_empty() {
                stream_name = req.write_stream.clone();
            }
            let answer = append_one(&s, &stream_name, req, &mut schema);
            if tx.send(answer).await.is_err() {
                return;
            }
        }
    }))
}

/// A response stream fed by a task (no async-stream crate needed).
fn async_stream<F, Fut>(
    f: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<pb::AppendRowsResponse, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::AppendRowsResponse, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn error_answer(stream: &str, code: Code, message: String) -> pb::AppendRowsResponse {
    pb::AppendRowsResponse {
        write_stream: stream.to_string(),
        response: Some(AppendResponse::Error(RpcStatus {
            code: code as i32,
            message,
            details: vec![],
        })),
        ..Default::default()
    }
}

fn append_one(
    s: &State,
    stream: &str,
    req: pb::AppendRowsRequest,
    schema: &mut Option<Decoder>,
) -> Result<pb::AppendRowsResponse, Status> {
    let Some(Rows::ProtoRows(data)) = req.rows else {
        return Err(Status::invalid_argument(
            "gRPC sink: only proto rows are modelled",
        ));
    };
    if let Some(d) = data.writer_schema.and_then(|w| w.proto_descriptor) {
        *schema = Some(Decoder::new(d));
    }
    let Some(decoder) = schema.as_ref() else {
        return Err(Status::invalid_argument(
            "the first AppendRows request of a connection must carry the writer schema",
        ));
    };
    let rows = data.rows.map(|r| r.serialized_rows).unwrap_or_default();
    s.appends.fetch_add(1, Ordering::Relaxed);

    // Decode every row before touching the stream: a request is written whole or not at all.
    let mut row_errors = Vec::new();
    let mut fields = 0u64;
    let mut bytes = 0u64;
    for (i, r) in rows.iter().enumerate() {
        bytes += r.len() as u64;
        match decoder.decode(r) {
            Ok(n) => fields += n,
            Err(message) => row_errors.push(pb::RowError {
                index: i as i64,
                code: pb::row_error::RowErrorCode::FieldsError as i32,
                message,
            }),
        }
    }
    if !row_errors.is_empty() {
        s.bad_rows
            .fetch_add(row_errors.len() as u64, Ordering::Relaxed);
        let mut a = error_answer(
            stream,
            Code::InvalidArgument,
            "rows did not decode with the writer schema".into(),
        );
        a.row_errors = row_errors;
        return Ok(a);
    }

    let n = rows.len() as i64;
    let offset = {
        let mut streams = s.streams.lock().unwrap();
        let is_default = stream.ends_with("/streams/_default");
        if is_default {
            None
        } else {
            let Some(st) = streams.get_mut(stream) else {
                return Ok(error_answer(
                    stream,
                    Code::NotFound,
                    format!("stream {stream} not found"),
                ));
            };
            if st.finalized {
                return Ok(error_answer(
                    stream,
                    Code::InvalidArgument,
                    format!("stream {stream} is finalized"),
                ));
            }
            match req.offset {
                Some(o) if o < st.rows => {
                    s.offset_refusals.fetch_add(1, Ordering::Relaxed);
                    return Ok(error_answer(
                        stream,
                        Code::AlreadyExists,
                        format!("offset {o} already written (stream at {})", st.rows),
                    ));
                }
                Some(o) if o > st.rows => {
                    s.offset_refusals.fetch_add(1, Ordering::Relaxed);
                    return Ok(error_answer(
                        stream,
                        Code::OutOfRange,
                        format!("offset {o} beyond the end of the stream ({})", st.rows),
                    ));
                }
                _ => {}
            }
            let at = st.rows;
            st.rows += n;
            Some(at)
        }
    };
    s.rows.fetch_add(n as u64, Ordering::Relaxed);
    s.row_bytes.fetch_add(bytes, Ordering::Relaxed);
    s.fields.fetch_add(fields, Ordering::Relaxed);
    {
        let now = Instant::now();
        let mut w = s.window.lock().unwrap();
        w.0.get_or_insert(now);
        w.1 = Some(now);
    }
    Ok(pb::AppendRowsResponse {
        write_stream: stream.to_string(),
        response: Some(AppendResponse::AppendResult(AppendResult { offset })),
        ..Default::default()
    })
}

/// Decodes rows of one descriptor (and its nested types) from the protobuf wire format.
struct Decoder {
    root: DescriptorProto,
}

#[derive(Clone, Copy, PartialEq)]
enum Wire {
    Varint = 0,
    Fixed64 = 1,
    Len = 2,
    Fixed32 = 5,
}

impl Decoder {
    fn new(root: DescriptorProto) -> Self {
        Self { root }
    }

    /// Decode one row; the number of field values read.
    fn decode(&self, row: &[u8]) -> Result<u64, String> {
        decode_message(&self.root, &self.root, row, 0)
    }
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], String> {
    let end = pos.checked_add(n).filter(|&e| e <= buf.len());
    let end = end.ok_or_else(|| format!("field of {n} bytes runs past the end"))?;
    let b = &buf[*pos..end];
    *pos = end;
    Ok(b)
}

fn wire_of(t: Type) -> Wire {
    match t {
        Type::Double | Type::Fixed64 | Type::Sfixed64 => Wire::Fixed64,
        Type::Float | Type::Fixed32 | Type::Sfixed32 => Wire::Fixed32,
        Type::String | Type::Bytes | Type::Message | Type::Group => Wire::Len,
        _ => Wire::Varint,
    }
}

/// The nested type `type_name` names (`.Row.Inner` or `Inner`), among `root`'s nested types.
fn nested<'a>(root: &'a DescriptorProto, type_name: &str) -> Option<&'a DescriptorProto> {
    let short = type_name.rsplit('.').next().unwrap_or(type_name);
    let mut todo = vec![root];
    while let Some(d) = todo.pop() {
        if d.name() == short {
            return Some(d);
        }
        todo.extend(d.nested_type.iter());
    }
    None
}

fn decode_message(
    root: &DescriptorProto,
    desc: &DescriptorProto,
    buf: &[u8],
    depth: usize,
) -> Result<u64, String> {
    if depth > 15 {
        return Err("messages nested more than 15 deep".into());
    }
    let mut pos = 0;
    let mut values = 0u64;
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos)?;
        let number = (key >> 3) as i32;
        let wire = (key & 7) as u8;
        let field: &FieldDescriptorProto = desc
            .field
            .iter()
            .find(|f| f.number() == number)
            .ok_or_else(|| format!("field number {number} is not in the writer schema"))?;
        let t = field.r#type();
        let expected = wire_of(t);
        let repeated = field.label() == Label::Repeated;
        if wire == Wire::Len as u8 && expected != Wire::Len && repeated {
            // Packed repeated scalars.
            let n = read_varint(buf, &mut pos)? as usize;
            let packed = take(buf, &mut pos, n)?;
            let mut p = 0;
            while p < packed.len() {
                scalar(t, expected, packed, &mut p, field)?;
                values += 1;
            }
            continue;
        }
        if wire != expected as u8 {
            return Err(format!(
                "field {} has wire type {wire}, its type {t:?} wants {}",
                field.name(),
                expected as u8
            ));
        }
        match expected {
            Wire::Len => {
                let n = read_varint(buf, &mut pos)? as usize;
                let b = take(buf, &mut pos, n)?;
                match t {
                    Type::String => {
                        std::str::from_utf8(b)
                            .map_err(|_| format!("field {} is not UTF-8", field.name()))?;
                    }
                    Type::Message | Type::Group => {
                        let inner = nested(root, field.type_name()).ok_or_else(|| {
                            format!("field {}: no type {}", field.name(), field.type_name())
                        })?;
                        values += decode_message(root, inner, b, depth + 1)?;
                    }
                    _ => {}
                }
            }
            w => scalar(t, w, buf, &mut pos, field)?,
        }
        values += 1;
    }
    Ok(values)
}

fn scalar(
    t: Type,
    w: Wire,
    buf: &[u8],
    pos: &mut usize,
    field: &FieldDescriptorProto,
) -> Result<(), String> {
    match w {
        Wire::Varint => {
            let v = read_varint(buf, pos)?;
            if t == Type::Bool && v > 1 {
                return Err(format!("field {}: bool {v}", field.name()));
            }
        }
        Wire::Fixed64 => {
            take(buf, pos, 8)?;
        }
        Wire::Fixed32 => {
            take(buf, pos, 4)?;
        }
        Wire::Len => return Err(format!("field {}: not a scalar", field.name())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Row {
        #[prost(int64, tag = "1")]
        id: i64,
        #[prost(string, optional, tag = "2")]
        body: Option<String>,
        #[prost(double, tag = "3")]
        score: f64,
        #[prost(string, repeated, tag = "4")]
        tags: Vec<String>,
        #[prost(int64, repeated, tag = "5")]
        ids: Vec<i64>,
        #[prost(bool, tag = "6")]
        flag: bool,
    }

    fn descriptor() -> DescriptorProto {
        let f = |n: &str, num: i32, t: Type, label: Label| FieldDescriptorProto {
            name: Some(n.into()),
            number: Some(num),
            r#type: Some(t as i32),
            label: Some(label as i32),
            ..Default::default()
        };
        DescriptorProto {
            name: Some("Row".into()),
            field: vec![
                f("id", 1, Type::Int64, Label::Optional),
                f("body", 2, Type::String, Label::Optional),
                f("score", 3, Type::Double, Label::Optional),
                f("tags", 4, Type::String, Label::Repeated),
                f("ids", 5, Type::Int64, Label::Repeated),
                f("flag", 6, Type::Bool, Label::Optional),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn rows_decode_with_their_descriptor_and_bad_ones_do_not() {
        let d = Decoder::new(descriptor());
        let row = Row {
            id: 7,
            body: Some("héllo".into()),
            score: 1.5,
            tags: vec!["a".into(), "b".into()],
            ids: vec![1, 2, 3],
            flag: true,
        };
        // prost packs repeated int64: both forms decode.
        assert_eq!(d.decode(&row.encode_to_vec()), Ok(9));
        let mut bad = row.encode_to_vec();
        bad.truncate(bad.len() - 1);
        assert!(d.decode(&bad).is_err());
        // Field 9 is not in the schema; field 1 sent as a string is the wrong wire type.
        assert!(d.decode(&[0x48, 1]).is_err());
        assert!(d.decode(&[0x0a, 1, b'x']).is_err());
        assert!(d.decode(&[0x12, 1, 0xff]).is_err());
    }
}
