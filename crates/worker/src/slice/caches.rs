//! What the slices of one process share: a BigQuery client per tenant, a slice plan per table,
//! the read horizon.

use crate::{CachedPlan, Worker, WorkerError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use std::sync::Arc;
use std::time::Instant;
use tenantsync_bigquery::{BigQuery, Credentials, StorageSink, WriteSink};
use tenantsync_core::hashing::{ColumnHasher, HashKey};
use tenantsync_core::names::{self, TableNames};
use tenantsync_core::{TableSpec, Tenant, WriteApi};
use tenantsync_store::SlicePlan;
use tracing::warn;

impl Worker {
    /// The tenant's client when the cached one was built from the sealed key whose nonce is
    /// `nonce` (read by the slice's first statement): a rotated key is used from the next slice
    /// on, in every worker. Otherwise the key is read and a new client built.
    pub(crate) async fn client_for(
        &self,
        tenant: &Tenant,
        nonce: Option<&[u8]>,
    ) -> Result<Arc<BigQuery>, WorkerError> {
        if let Some((v, c)) = self.caches.clients.lock().await.get(&tenant.id) {
            if v.as_slice() == nonce.unwrap_or_default() {
                return Ok(c.clone());
            }
        }
        self.client(tenant).await
    }

    /// The hasher of the table's `--hash-column`s under the tenant's secret (made and sealed
    /// the first time a table of the tenant needs one); None without hashed columns.
    pub(crate) async fn hasher(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
    ) -> Result<Option<Arc<ColumnHasher>>, WorkerError> {
        if spec.hash_columns.is_empty() {
            return Ok(None);
        }
        let key = self.hash_key(tenant).await?;
        Ok(Some(Arc::new(ColumnHasher::new(
            key,
            spec.hash_columns.clone(),
        ))))
    }

    pub(crate) async fn hash_key(&self, tenant: &Tenant) -> Result<Arc<HashKey>, WorkerError> {
        if let Some(k) = self.caches.hash_keys.lock().await.get(&tenant.id) {
            return Ok(k.clone());
        }
        let master = &self.deps.master_key;
        let sealed = self
            .deps
            .control
            .hash_key(tenant.id, || {
                // Sealed as base64 text: the envelope opens to a string.
                let k = HashKey::generate();
                master.seal(B64.encode(k.expose_bytes()).as_bytes(), tenant.id)
            })
            .await?;
        let text = master.open(&sealed, tenant.id)?;
        let bytes = B64
            .decode(text.expose_secret())
            .ok()
            .and_then(|b| HashKey::from_bytes(&b))
            .ok_or_else(|| {
                WorkerError::Config(format!(
                    "tenant {}'s hashing secret is not 32 bytes of base64",
                    tenant.slug
                ))
            })?;
        let key = Arc::new(bytes);
        self.caches
            .hash_keys
            .lock()
            .await
            .insert(tenant.id, key.clone());
        Ok(key)
    }

    /// The tenant's client. The sealed key is read (one small query) and its nonce compared
    /// with the cached client's.
    pub(crate) async fn client(&self, tenant: &Tenant) -> Result<Arc<BigQuery>, WorkerError> {
        let sealed = self.deps.control.credentials(tenant.id).await?;
        // A new key, or a location recorded since (`tenant update --location`), is a new client.
        let mut version = sealed.as_ref().map(|s| s.nonce.clone()).unwrap_or_default();
        version.extend(tenant.bq_location.as_deref().unwrap_or_default().bytes());
        version.extend(tenant.impersonate.as_deref().unwrap_or_default().bytes());
        let mut clients = self.caches.clients.lock().await;
        if let Some((v, c)) = clients.get(&tenant.id) {
            if *v == version {
                return Ok(c.clone());
            }
        }
        let key = sealed
            .map(|s| self.deps.master_key.open(&s, tenant.id))
            .transpose()?;
        let emulator = self.cfg.endpoint.emulator;
        let creds = Credentials::of_tenant(key, tenant.impersonate.as_deref(), emulator)
            .ok_or_else(|| {
                WorkerError::Config(format!(
                    "tenant {} has no credentials and BIGQUERY_EMULATOR_HOST is not set",
                    tenant.slug
                ))
            })?;
        let c = Arc::new(
            BigQuery::new(
                &self.cfg.endpoint,
                &tenant.bq_project,
                &tenant.bq_dataset,
                &creds,
                self.cfg.request_timeout,
            )
            .await?
            .with_location(tenant.bq_location.clone()),
        );
        clients.insert(tenant.id, (version, c.clone()));
        Ok(c)
    }

    /// The sink of `spec`'s write method for `tenant`, on its current client.
    pub(crate) async fn sink_for(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
        nonce: Option<&[u8]>,
    ) -> Result<WriteSink, WorkerError> {
        let client = self.client_for(tenant, nonce).await?;
        match self.write_method(spec) {
            WriteApi::InsertAll => Ok(WriteSink::InsertAll(client)),
            WriteApi::Storage => Ok(WriteSink::Storage(self.storage_sink(tenant, client).await?)),
        }
    }

    /// How `spec`'s rows are written. CDC mode needs the Storage Write API's default stream
    /// (its pseudo-columns exist nowhere else): it implies that method whatever the table or
    /// deployment names.
    pub(crate) fn write_method(&self, spec: &TableSpec) -> WriteApi {
        if spec.mode == tenantsync_core::Mode::Cdc {
            WriteApi::Storage
        } else {
            spec.write_api.unwrap_or(self.cfg.write_api)
        }
    }

    /// The tenant's Storage Write sink: cached while it is built on the tenant's current
    /// client (it keeps the encoders of the tenant's tables and its slices' open streams).
    async fn storage_sink(
        &self,
        tenant: &Tenant,
        client: Arc<BigQuery>,
    ) -> Result<Arc<StorageSink>, WorkerError> {
        let mut sinks = self.caches.storage.lock().await;
        if let Some(s) = sinks.get(&tenant.id) {
            if Arc::ptr_eq(s.rest(), &client) {
                return Ok(s.clone());
            }
        }
        let channel = match self.caches.channel.get() {
            Some(c) => c.clone(),
            None => {
                let url = self.cfg.endpoint.storage_url.as_deref().ok_or_else(|| {
                    WorkerError::Config(
                        "a table writes through the Storage Write API, but no endpoint is set \
                         for it (BIGQUERY_STORAGE_EMULATOR_HOST next to BIGQUERY_EMULATOR_HOST)"
                            .into(),
                    )
                })?;
                let c = tenantsync_bigquery::storage::channel(url, self.cfg.request_timeout)?;
                self.caches.channel.get_or_init(|| c).clone()
            }
        };
        let sink = Arc::new(StorageSink::new(client, channel));
        sinks.insert(tenant.id, sink.clone());
        Ok(sink)
    }

    /// Drop the cached client of a tenant (after its credentials changed or failed).
    pub async fn forget_client(&self, tenant_id: i64) {
        self.caches.clients.lock().await.remove(&tenant_id);
    }

    /// The slice plan of a table. Built from the catalog once per process and spec, not per
    /// slice (two catalog queries were a sixth of a slice's statements): every slice read
    /// compares the catalog's fingerprint with the plan's, and a column added in Postgres
    /// makes that read fail with `CatalogChanged`, so the slice builds the plan again
    /// ([`Self::forget_plan`]) before it sends anything.
    pub(crate) async fn plan(&self, spec: &TableSpec) -> Result<Arc<SlicePlan>, WorkerError> {
        if let Some(p) = self.caches.plans.lock().await.get(&spec.id) {
            if p.spec == *spec {
                return Ok(p.plan.clone());
            }
        }
        // Tables registered before names were checked may share a BigQuery object; the later
        // one stops with the refusal `tables add` gives now, the earlier one keeps its data.
        // Names that differ only in case are two tables in a default (case-sensitive)
        // dataset: those keep syncing, with a warning.
        let tables = self.deps.control.tables().await?;
        let earlier: Vec<TableNames<'_>> = tables
            .iter()
            .filter(|t| t.id < spec.id)
            .map(TableNames::of)
            .collect();
        // One table at a time (and none, for tenantsync's own names), so a meeting in case
        // only does not hide a real one behind it.
        for others in std::iter::once(&[][..]).chain(earlier.chunks(1)) {
            match names::check_new_table(&TableNames::of(spec), others) {
                Ok(()) => {}
                Err(e) if e.is_case_only() => {
                    warn!(table = %spec.source_table, error = %e, "table names differ only in case")
                }
                Err(e) => return Err(WorkerError::Config(e.to_string())),
            }
        }
        let (columns, fingerprint) = self
            .deps
            .source
            .catalog(&spec.source_schema, &spec.source_table)
            .await?;
        let mut plan = SlicePlan::build(spec, &columns)?.with_catalog(fingerprint);
        // Storage Write tables: slice reads encode each row's message straight from the
        // binary values (no JSON rendered, then parsed again in the sink). Not with hashed
        // columns: the hash replaces a value in the row's JSON (the sink encodes the result).
        if self.write_method(spec) == WriteApi::Storage && spec.hash_columns.is_empty() {
            plan = plan.with_proto(spec.mode == tenantsync_core::Mode::Cdc);
        }
        let plan = Arc::new(plan);
        self.caches.plans.lock().await.insert(
            spec.id,
            CachedPlan {
                spec: spec.clone(),
                plan: plan.clone(),
            },
        );
        Ok(plan)
    }

    pub(crate) async fn forget_plan(&self, table_id: i64) {
        self.caches.plans.lock().await.remove(&table_id);
    }

    /// The read horizon, shared by the slices that start within `horizon_reuse` of one
    /// another. Reusing an older horizon is safe: every row below it was committed when it
    /// was computed, so a later read finds them all; rows past it wait for a later slice.
    /// A cached horizon earlier than `at_least` (the coordinator's detection of the task's
    /// changes) is not reused: the slice would stop short of the rows it was queued for and
    /// leave them for its next turn, a sync interval later (about 1 s of lag for a share of
    /// the rows in the freshness benchmark).
    pub(crate) async fn horizon(
        &self,
        at_least: Option<DateTime<Utc>>,
    ) -> Result<DateTime<Utc>, WorkerError> {
        // Held across the query, so slices that start together send one query, not one each.
        let mut cached = self.caches.horizon.lock().await;
        if let Some((at, h)) = *cached {
            if at.elapsed() < self.cfg.horizon_reuse && at_least.is_none_or(|t| h >= t) {
                return Ok(h);
            }
        }
        // The age counts from before the query: the result is at least that old.
        let at = Instant::now();
        let h = self.deps.source.horizon(self.cfg.cursor_skew).await?;
        *cached = Some((at, h));
        Ok(h)
    }
}
