//! The statements of concurrent slices, sent together.
//!
//! Every slice starts with a claim, reads its first rows and ends with a commit. At hundreds of
//! small slices a second those statements, each with its own round trip (and the claim and
//! commit with their own commit), were most of Postgres' time per slice. A [`Batcher`] sends
//! the requests of slices that reach the same step at about the same time as one statement: a
//! request waits only while the batch before it runs, and whatever queued meanwhile goes into
//! the next batch. A slice alone costs what it did before; slices that pile up share
//! statements.

use crate::WorkerError;
use chrono::{DateTime, Utc};
use std::future::Future;
use std::sync::Arc;
use tenantsync_store::control::tasks::{Finish, FinishRequest, SliceStart, TaskId, Watermark};
use tenantsync_store::{ControlPlane, GroupRead, SlicePlan, SourceReader, SourceRow, StoreError};
use tokio::sync::{mpsc, oneshot};

/// Most requests in one statement.
const MAX_BATCH: usize = 64;

pub(crate) struct Batcher<Req, Resp> {
    tx: mpsc::UnboundedSender<(Req, oneshot::Sender<Resp>)>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Start the batching task; `run` answers a batch with one response per request, in order.
    /// The task ends when the batcher is dropped.
    fn spawn<F, Fut>(run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Resp>> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Req, oneshot::Sender<Resp>)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (reqs, replies): (Vec<Req>, Vec<oneshot::Sender<Resp>>) =
                    batch.into_iter().unzip();
                crate::metrics::statement_batch(reqs.len());
                for (reply, resp) in replies.into_iter().zip(run(reqs).await) {
                    // The caller may have given up (its slice was cancelled): nothing to do.
                    let _ = reply.send(resp);
                }
            }
        });
        Self { tx }
    }

    async fn call(&self, req: Req) -> Result<Resp, WorkerError> {
        let (reply, answer) = oneshot::channel();
        let gone = || WorkerError::Config("the statement batcher stopped".into());
        self.tx.send((req, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }
}

/// A slice's first read (see [`Statements::read`]).
pub(crate) struct ReadRequest {
    pub(crate) plan: Arc<SlicePlan>,
    pub(crate) organization_id: String,
    pub(crate) watermark: Watermark,
    pub(crate) horizon: DateTime<Utc>,
    pub(crate) limit: i64,
}

type ReadAnswer = Result<Vec<SourceRow>, StoreError>;

/// The claim, first-read and commit batchers of one worker process.
pub(crate) struct Statements {
    start: Batcher<TaskId, Result<SliceStart, StoreError>>,
    read: Batcher<ReadRequest, ReadAnswer>,
    finish: Batcher<FinishRequest, Result<Finish, StoreError>>,
}

/// Answer a batch of first reads: one statement per table plan among them (tenants of the
/// same table read together), each request on its own when its plan has no group read or the
/// group statement failed (each caller then gets its own answer, a changed catalog included).
async fn read_batch(source: &SourceReader, reqs: Vec<ReadRequest>) -> Vec<ReadAnswer> {
    let alone = |r: &ReadRequest| {
        let source = source.clone();
        let (plan, org, wm, h, n) = (
            r.plan.clone(),
            r.organization_id.clone(),
            r.watermark.clone(),
            r.horizon,
            r.limit,
        );
        async move { source.read_slice(&plan, &org, &wm, h, n).await }
    };
    let mut groups: Vec<(Arc<SlicePlan>, Vec<usize>)> = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        match groups.iter_mut().find(|(p, _)| Arc::ptr_eq(p, &r.plan)) {
            Some((_, members)) => members.push(i),
            None => groups.push((r.plan.clone(), vec![i])),
        }
    }
    let mut out: Vec<Option<ReadAnswer>> = (0..reqs.len()).map(|_| None).collect();
    for (plan, members) in groups {
        if members.len() > 1 && SourceReader::reads_groups(&plan) {
            let group: Vec<GroupRead<'_>> = members
                .iter()
                .map(|&i| GroupRead {
                    organization_id: &reqs[i].organization_id,
                    watermark: &reqs[i].watermark,
                    horizon: reqs[i].horizon,
                    limit: reqs[i].limit,
                })
                .collect();
            if let Ok(rows) = source.read_slices(&plan, &group).await {
                for (&i, rows) in members.iter().zip(rows) {
                    out[i] = Some(Ok(rows));
                }
                continue;
            }
        }
        for i in members {
            out[i] = Some(alone(&reqs[i]).await);
        }
    }
    out.into_iter()
        .map(|a| a.expect("every request answered"))
        .collect()
}

impl Statements {
    pub(crate) fn spawn(control: &ControlPlane, source: &SourceReader) -> Self {
        let s = source.clone();
        let read = Batcher::spawn(move |reqs: Vec<ReadRequest>| {
            let s = s.clone();
            async move { read_batch(&s, reqs).await }
        });
        let c = control.clone();
        let start = Batcher::spawn(move |tasks: Vec<TaskId>| {
            let c = c.clone();
            async move {
                match c.start_slices(&tasks).await {
                    Ok(starts) => starts,
                    Err(e) if tasks.len() == 1 => vec![Err(e)],
                    // The statement failed as a whole (a deadlock, a lost connection): each
                    // task on its own, so each caller gets its own answer.
                    Err(_) => {
                        let mut out = Vec::with_capacity(tasks.len());
                        for t in tasks {
                            out.push(c.start_slice(t).await);
                        }
                        out
                    }
                }
            }
        });
        let c = control.clone();
        let finish = Batcher::spawn(move |reqs: Vec<FinishRequest>| {
            let c = c.clone();
            async move {
                match c.finish_slices(&reqs).await {
                    Ok(done) => done.into_iter().map(Ok).collect(),
                    Err(e) if reqs.len() == 1 => vec![Err(e)],
                    Err(_) => {
                        let mut out = Vec::with_capacity(reqs.len());
                        for r in &reqs {
                            out.push(c.finish_slices(std::slice::from_ref(r)).await.map(|f| f[0]));
                        }
                        out
                    }
                }
            }
        });
        Self {
            start,
            read,
            finish,
        }
    }

    pub(crate) async fn start(&self, task: TaskId) -> Result<SliceStart, WorkerError> {
        Ok(self.start.call(task).await??)
    }

    /// A slice's first rows after its claimed watermark, read together with other slices'
    /// first rows (of the same table, in one statement) when they start together.
    pub(crate) async fn read(&self, req: ReadRequest) -> Result<Vec<SourceRow>, StoreError> {
        self.read
            .call(req)
            .await
            .map_err(|e| StoreError::Invalid(e.to_string()))?
    }

    pub(crate) async fn finish(&self, req: FinishRequest) -> Result<Finish, WorkerError> {
        Ok(self.finish.call(req).await??)
    }
}
