//! The BigQuery v2 REST calls tenantsync makes, for one tenant's dataset.

use crate::auth::{Credentials, TokenSource, TokenUriPolicy};
use crate::error::BqError;
use crate::listings::{ensure_listings, listed_before, listings_table};
use crate::schema::{
    current_table, drop_excluded, final_fields, full_view_sql, latest_view_sql, merge_point,
    read_from, sync_current, sync_fields, sync_fields_with, table_fields, versions_layout,
    SchemaChange,
};
use crate::sink::{Sink, TableDef};
use chrono::{SecondsFormat, Utc};
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tenantsync_core::mapping::BqField;
use tenantsync_core::Mode;

/// Where the API lives: Google, or the local emulator (`BIGQUERY_EMULATOR_HOST`, the variable
/// Google's own client libraries read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub base_url: String,
    /// The Storage Write API's gRPC endpoint: Google's, the local BigQuery's gRPC port
    /// (`BIGQUERY_STORAGE_EMULATOR_HOST`), or none (an emulator run without it: tables set to
    /// `--write-api storage` then fail with an error saying so).
    pub storage_url: Option<String>,
    pub emulator: bool,
    /// Token endpoints service-account keys may name. Emulator mode does not widen it: a key
    /// is a customer's file wherever the API is.
    pub token_uri_policy: TokenUriPolicy,
    /// The deployment's own account, for tenants onboarded with `--impersonate`.
    pub impersonator: Option<Arc<crate::Impersonator>>,
}

impl Endpoint {
    pub fn google() -> Self {
        Self {
            base_url: "https://bigquery.googleapis.com/bigquery/v2".into(),
            storage_url: Some(crate::storage::GOOGLE_STORAGE_URL.into()),
            emulator: false,
            token_uri_policy: TokenUriPolicy::google_only(),
            impersonator: None,
        }
    }

    /// `host:port` of the emulator, or a full URL (used by tests that put a proxy in front).
    pub fn emulator(host: &str) -> Self {
        let base = if host.starts_with("http://") || host.starts_with("https://") {
            host.trim_end_matches('/').to_string()
        } else {
            format!("http://{host}")
        };
        Self {
            base_url: format!("{base}/bigquery/v2"),
            storage_url: None,
            emulator: true,
            token_uri_policy: TokenUriPolicy::google_only(),
            impersonator: None,
        }
    }

    pub fn from_env_value(host: Option<&str>) -> Self {
        match host {
            Some(h) if !h.is_empty() => Self::emulator(h),
            _ => Self::google(),
        }
    }

    /// The same endpoint writing through the local BigQuery's gRPC port at `host` (`host:port`
    /// or a URL), when given. Google's endpoint keeps its own.
    pub fn with_storage_emulator(mut self, host: Option<&str>) -> Self {
        if let Some(h) = host.filter(|h| !h.is_empty()) {
            self.storage_url = Some(if h.contains("://") {
                h.trim_end_matches('/').to_string()
            } else {
                format!("http://{h}")
            });
        }
        self
    }

    /// Impersonate tenants' accounts (`tenant add --impersonate`) as this one.
    pub fn with_impersonator(mut self, by: Option<Arc<crate::Impersonator>>) -> Self {
        self.impersonator = by;
        self
    }

    /// The same endpoint with another token endpoint policy.
    pub fn with_token_uri_policy(mut self, policy: TokenUriPolicy) -> Self {
        self.token_uri_policy = policy;
        self
    }
}

pub use crate::sink::{InsertOutcome, RowError};

/// A client for one tenant: its credentials, its project and dataset.
#[derive(Clone)]
pub struct BigQuery {
    http: reqwest::Client,
    base: String,
    project: String,
    dataset: String,
    /// Where the dataset must be (None: wherever it is; created in BigQuery's default).
    location: Option<String>,
    tokens: TokenSource,
}

impl std::fmt::Debug for BigQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BigQuery")
            .field("base", &self.base)
            .field("project", &self.project)
            .field("dataset", &self.dataset)
            .finish_non_exhaustive()
    }
}

/// rustls needs one process-wide crypto provider; ring is the one we build with.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl BigQuery {
    pub async fn new(
        endpoint: &Endpoint,
        project: &str,
        dataset: &str,
        creds: &Credentials,
        timeout: Duration,
    ) -> Result<Self, BqError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| BqError::Invalid(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: endpoint.base_url.clone(),
            project: project.to_string(),
            dataset: dataset.to_string(),
            location: None,
            tokens: TokenSource::new(
                creds,
                &endpoint.token_uri_policy,
                endpoint.impersonator.as_ref(),
            )
            .await?,
        })
    }

    /// The client of a dataset that must be in `location` (as [`tenantsync_core::location`]
    /// spells it): [`Self::ensure_dataset`] creates it there and refuses one found elsewhere.
    pub fn with_location(mut self, location: Option<String>) -> Self {
        self.location = location;
        self
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    pub(crate) fn tokens(&self) -> &TokenSource {
        &self.tokens
    }

    /// `project.dataset.table` quoted for Standard SQL.
    pub fn qualified(&self, table: &str) -> String {
        format!("`{}.{}.{}`", self.project, self.dataset, table)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Value, BqError> {
        let token = self.tokens.token().await?;
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        if !(200..300).contains(&status) {
            return Err(BqError::from_response(status, &text));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|e| BqError::Transient(format!("unreadable response ({e}) from {path}")))
    }

    fn ds_path(&self) -> String {
        format!("/projects/{}/datasets/{}", self.project, self.dataset)
    }

    /// Create the dataset when missing, in the client's location when it has one. Returns
    /// whether it was created. A dataset that exists in another location is refused naming
    /// both: its location cannot be changed, and using it would put a tenant's data where it
    /// must not be.
    pub async fn ensure_dataset(&self) -> Result<bool, BqError> {
        match self.call(Method::GET, &self.ds_path(), None).await {
            Ok(ds) => return self.check_location(&ds).map(|()| false),
            Err(BqError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let mut body =
            json!({"datasetReference": {"projectId": self.project, "datasetId": self.dataset}});
        if let Some(loc) = &self.location {
            body["location"] = json!(loc);
        }
        match self
            .call(
                Method::POST,
                &format!("/projects/{}/datasets", self.project),
                Some(body.to_string().into_bytes()),
            )
            .await
        {
            Ok(_) => Ok(true),
            // Created by someone else meanwhile: its location is checked like any found one.
            Err(BqError::AlreadyExists(_)) => {
                let ds = self.call(Method::GET, &self.ds_path(), None).await?;
                self.check_location(&ds).map(|()| false)
            }
            Err(e) => Err(e),
        }
    }

    /// The dataset resource `ds` is where this client needs it.
    fn check_location(&self, ds: &Value) -> Result<(), BqError> {
        let Some(want) = &self.location else {
            return Ok(());
        };
        let have = ds["location"].as_str().unwrap_or("US");
        if tenantsync_core::location::same(have, want) {
            return Ok(());
        }
        Err(BqError::Invalid(format!(
            "dataset {}.{} exists in location {have}, not {want}: a dataset cannot be moved; \
             use another dataset, or the location it is in",
            self.project, self.dataset
        )))
    }

    /// Delete the dataset and everything in it (tenant removal, tests).
    pub async fn delete_dataset(&self) -> Result<(), BqError> {
        match self
            .call(
                Method::DELETE,
                &format!("{}?deleteContents=true", self.ds_path()),
                None,
            )
            .await
        {
            Ok(_) | Err(BqError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The table's resource, or None when it does not exist.
    pub async fn table_resource(&self, table: &str) -> Result<Option<Value>, BqError> {
        let path = format!("{}/tables/{table}", self.ds_path());
        match self.call(Method::GET, &path, None).await {
            Ok(v) => Ok(Some(v)),
            Err(BqError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The table's schema, or None when it does not exist.
    pub async fn table_schema(&self, table: &str) -> Result<Option<Vec<Value>>, BqError> {
        Ok(self.table_resource(table).await?.map(|v| {
            v["schema"]["fields"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        }))
    }

    /// Create a table. Returns false when it exists already.
    pub async fn create_table(&self, table: &str, fields: &[BqField]) -> Result<bool, BqError> {
        self.create_table_with(table, fields, &Value::Null).await
    }

    /// [`Self::create_table`] with more of the table resource (`extra`'s members, e.g.
    /// `tableConstraints` and `maxStaleness` of a CDC table).
    pub async fn create_table_with(
        &self,
        table: &str,
        fields: &[BqField],
        extra: &Value,
    ) -> Result<bool, BqError> {
        let mut body = json!({
            "tableReference": {"projectId": self.project, "datasetId": self.dataset, "tableId": table},
            "schema": {"fields": fields},
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        match self
            .call(
                Method::POST,
                &format!("{}/tables", self.ds_path()),
                Some(body.to_string().into_bytes()),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(BqError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Replace the schema with `fields` (which must keep every existing field).
    pub async fn patch_schema(&self, table: &str, fields: &[Value]) -> Result<(), BqError> {
        self.patch_table(table, json!({"schema": {"fields": fields}}))
            .await
    }

    /// PATCH the members of `body` into the table's resource.
    async fn patch_table(&self, table: &str, body: Value) -> Result<(), BqError> {
        self.call(
            Method::PATCH,
            &format!("{}/tables/{table}", self.ds_path()),
            Some(body.to_string().into_bytes()),
        )
        .await
        .map(|_| ())
    }

    /// A table's labels (an empty map when it has none); None when the table does not exist.
    pub async fn table_labels(
        &self,
        table: &str,
    ) -> Result<Option<serde_json::Map<String, Value>>, BqError> {
        Ok(self
            .table_resource(table)
            .await?
            .map(|v| v["labels"].as_object().cloned().unwrap_or_default()))
    }

    /// A label of a table holding a time in microseconds since the epoch (how tenantsync keeps
    /// its points); None when the table or the label is missing.
    pub async fn time_label(
        &self,
        table: &str,
        key: &str,
    ) -> Result<Option<chrono::DateTime<Utc>>, BqError> {
        let labels = self.table_labels(table).await?;
        Ok(labels
            .and_then(|l| l.get(key)?.as_str()?.parse::<i64>().ok())
            .and_then(chrono::DateTime::from_timestamp_micros))
    }

    /// Set one label of a table (the others stay).
    pub async fn set_label(&self, table: &str, key: &str, value: &str) -> Result<(), BqError> {
        self.patch_table(table, json!({"labels": {key: value}}))
            .await
    }

    /// Create a view, or replace its query when it exists: one DDL statement, atomic on
    /// BigQuery (a dashboard never finds the view missing). Not tables.insert then
    /// tables.patch: the local BigQuery's patch changes only the stored resource, and the view
    /// kept answering with its first query (measured: a narrowed `_latest` still read every
    /// version; docs/emulator-notes.md).
    pub async fn put_view(&self, name: &str, sql: &str) -> Result<(), BqError> {
        let ddl = format!("CREATE OR REPLACE VIEW {} AS {sql}", self.qualified(name));
        self.query(&ddl).await.map(|_| ())
    }

    /// insertAll with rows already serialized as `{"insertId":…,"json":{…}}`. The body is
    /// assembled from those strings without re-parsing them.
    pub async fn insert_all(&self, table: &str, rows: &[&str]) -> Result<InsertOutcome, BqError> {
        let len: usize = rows.iter().map(|r| r.len() + 1).sum::<usize>() + 64;
        let mut body = Vec::with_capacity(len);
        body.extend_from_slice(br#"{"skipInvalidRows":false,"ignoreUnknownValues":false,"rows":["#);
        for (i, r) in rows.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(r.as_bytes());
        }
        body.extend_from_slice(b"]}");
        let v = self
            .call(
                Method::POST,
                &format!("{}/tables/{table}/insertAll", self.ds_path()),
                Some(body),
            )
            .await?;
        let mut row_errors = Vec::new();
        for e in v["insertErrors"].as_array().into_iter().flatten() {
            let index = e["index"].as_u64().unwrap_or(0) as usize;
            let first = &e["errors"][0];
            row_errors.push(RowError {
                index,
                reason: first["reason"].as_str().unwrap_or("unknown").to_string(),
                message: first["message"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(InsertOutcome { row_errors })
    }

    /// Run a Standard SQL query and return its rows as JSON values (`f[i].v`), following pages.
    pub async fn query(&self, sql: &str) -> Result<Vec<Vec<Value>>, BqError> {
        // Integer microseconds for TIMESTAMP: the default (float seconds) loses precision.
        let mut body = json!({"query": sql, "useLegacySql": false, "timeoutMs": 60000, "maxResults": 10000,
                          "formatOptions": {"useInt64Timestamp": true}});
        if let Some(loc) = &self.location {
            body["location"] = json!(loc);
        }
        let mut v = self
            .call(
                Method::POST,
                &format!("/projects/{}/queries", self.project),
                Some(body.to_string().into_bytes()),
            )
            .await?;
        let job_id = v["jobReference"]["jobId"].as_str().map(str::to_string);
        // A job in a single region (europe-west1) is not found without its location when
        // polled or paged: BigQuery names it in the job reference.
        let job_location = v["jobReference"]["location"]
            .as_str()
            .map(str::to_string)
            .or_else(|| self.location.clone());
        let mut out = Vec::new();
        loop {
            if v["jobComplete"].as_bool() == Some(false) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            } else {
                for row in v["rows"].as_array().into_iter().flatten() {
                    out.push(
                        row["f"]
                            .as_array()
                            .map(|fs| fs.iter().map(|f| f["v"].clone()).collect())
                            .unwrap_or_default(),
                    );
                }
            }
            let token = v["pageToken"].as_str().map(str::to_string);
            let incomplete = v["jobComplete"].as_bool() == Some(false);
            let Some(job) = job_id.as_deref() else { break };
            if token.is_none() && !incomplete {
                break;
            }
            let mut path = format!(
                "/projects/{}/queries/{job}?maxResults=10000&formatOptions.useInt64Timestamp=true",
                self.project
            );
            if let Some(t) = token {
                path.push_str(&format!("&pageToken={t}"));
            }
            if let Some(loc) = &job_location {
                path.push_str(&format!("&location={loc}"));
            }
            v = self.call(Method::GET, &path, None).await?;
        }
        Ok(out)
    }
}

/// What a CDC table's resource adds to its schema: the primary key BigQuery applies
/// `UPSERT`/`DELETE` rows by (`PRIMARY KEY (...) NOT ENFORCED`), and `max_staleness` as an
/// INTERVAL literal (`Y-M D H:M:S`).
pub fn cdc_table_resource(keys: &[String], max_staleness_s: i32) -> Value {
    let s = i64::from(max_staleness_s.max(1));
    json!({
        "tableConstraints": {"primaryKey": {"columns": keys}},
        "maxStaleness": format!("0-0 0 {}:{}:{}", s / 3600, s / 60 % 60, s % 60),
    })
}

/// The insertAll way of writing a slice.
impl Sink for BigQuery {
    fn dataset(&self) -> &str {
        &self.dataset
    }

    fn write_api(&self) -> tenantsync_core::WriteApi {
        tenantsync_core::WriteApi::InsertAll
    }

    async fn ensure_dataset(&self) -> Result<bool, BqError> {
        BigQuery::ensure_dataset(self).await
    }

    async fn ensure_table(&self, def: &TableDef<'_>) -> Result<SchemaChange, BqError> {
        // Before the views are written again below: a view naming a dropped column fails.
        let plain: Vec<String> = def.excluded.iter().chain(def.hashed).cloned().collect();
        for t in [
            def.table.to_string(),
            current_table(def.table),
            format!("{}_final", def.table),
        ] {
            drop_excluded(self, &t, &plain).await?;
        }
        if def.mode == Mode::Cdc {
            // BigQuery keeps one row per key itself: no batch listing, no view.
            return sync_fields_with(
                self,
                def.table,
                table_fields(def.fields),
                &cdc_table_resource(def.keys, def.max_staleness_s),
            )
            .await;
        }
        ensure_listings(self, def.table).await?;
        let change = sync_fields_with(
            self,
            def.table,
            table_fields(def.fields),
            &versions_layout(def.fields, def.keys),
        )
        .await?;
        if def.mode == Mode::Merge {
            // Partial versions make a `_latest` view meaningless; `_final` is the merged table.
            sync_fields(
                self,
                &format!("{}_final", def.table),
                final_fields(def.fields),
            )
            .await?;
        } else {
            self.put_view(
                &format!("{}_latest", def.table),
                &self.latest_view_now(def).await?,
            )
            .await?;
        }
        Ok(change)
    }

    async fn append(
        &self,
        table: &str,
        _batch_id: &str,
        rows: &[&tenantsync_core::Payload],
    ) -> Result<InsertOutcome, BqError> {
        // JSON rows are borrowed as they are; a protobuf message (a table switched from the
        // Storage Write API under a running slice) is read back into its JSON.
        let json: Vec<_> = rows
            .iter()
            .map(|p| p.json().map_err(BqError::Invalid))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&str> = json.iter().map(|c| c.as_ref()).collect();
        // The insertIds de-duplicate a repeated request; each row names its batch itself.
        self.insert_all(table, &refs).await
    }

    async fn list_batches(
        &self,
        table: &str,
        batch_ids: &[String],
        rows: i64,
    ) -> Result<InsertOutcome, BqError> {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
        // The batch id is the insertId: a listing sent twice is one row.
        let payloads: Vec<String> = batch_ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                json!({"insertId": id, "json": {
                    "batch_id": id, "committed_at": now,
                    "rows": (i + 1 == batch_ids.len()).then_some(rows)}})
                .to_string()
            })
            .collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        self.insert_all(&listings_table(table), &refs).await
    }
}

impl BigQuery {
    /// `<table>_latest` after a schema change or a new release's views: narrowed to the last
    /// merge point when `<table>_current` has one (its columns brought along first, so the
    /// view can name them), else every version. Old listings may be pruned, so falling back
    /// to every version would read below the listing point for nothing.
    async fn latest_view_now(&self, def: &TableDef<'_>) -> Result<String, BqError> {
        if let Some(point) = merge_point(self, def.table).await? {
            let (cols, created) = sync_current(self, def.table, def.keys, &[]).await?;
            if !created {
                let since = Some(read_from(point, def.read_back));
                return Ok(latest_view_sql(self, def.table, def.keys, &cols, since));
            }
        }
        let listed = listed_before(self, def.table).await?;
        Ok(full_view_sql(self, def.table, def.keys, listed))
    }
}
