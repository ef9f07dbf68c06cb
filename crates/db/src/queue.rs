//! A database's write queue: concurrent write requests are applied together. The first
//! request to find the queue idle starts a writer on the blocking pool; the writer takes every
//! queued request, applies them in one hold of the write lock as one batch, waits for one
//! flush and answers them all, and repeats until the queue is empty. Thirty-two concurrent
//! PUTs thus cost a few batches and flushes instead of thirty-two of each, and a request costs
//! one thread hand-off (its answer) instead of four. A request cut short by the hold's time
//! slice (`write.rs`) rejoins the queue at the back, so other writers get in between slices.

use super::write::{DocInput, DocResult, WriteCtx};
use super::{Database, DbError, DbResult};
use std::collections::VecDeque;
use std::sync::{Arc, MutexGuard};
use tokio::sync::oneshot;

/// Documents a hold takes from further requests once it has this many (the first request is
/// always taken whole).
const HOLD_DOCS: usize = 5_000;

/// Holds a writer runs before giving its blocking-pool slot back to whoever waits for one.
const HOLDS_PER_SLOT: usize = 16;

/// One write request waiting or in progress.
pub(super) struct Job {
    pub(super) docs: VecDeque<DocInput>,
    pub(super) new_edits: bool,
    pub(super) ctx: WriteCtx,
    /// Results of the documents applied so far (a request can span holds).
    pub(super) results: Vec<DocResult>,
    reply: oneshot::Sender<DbResult<Vec<DocResult>>>,
}

impl Job {
    /// A request that must be applied in a hold of its own: all or nothing, or conditional.
    fn exclusive(&self) -> bool {
        self.ctx.atomic || self.ctx.expect_leaves.is_some()
    }
}

#[derive(Default)]
pub(super) struct WriteQueue {
    jobs: VecDeque<Job>,
    /// A writer is draining the queue (or about to).
    running: bool,
}

impl WriteQueue {
    /// The requests for the next hold: an exclusive one alone, or the others from the front.
    fn take(&mut self) -> Vec<Job> {
        let mut taken: Vec<Job> = Vec::new();
        let mut docs = 0;
        while let Some(job) = self.jobs.front() {
            // A request cut short before (it used a slice) goes alone too: others in its hold
            // would wait for its next slice.
            let alone = job.exclusive() || !job.results.is_empty();
            if !taken.is_empty() && (alone || docs >= HOLD_DOCS) {
                break;
            }
            docs += job.docs.len();
            taken.extend(self.jobs.pop_front());
            if alone {
                break;
            }
        }
        taken
    }
}

impl Database {
    fn queue(&self) -> MutexGuard<'_, WriteQueue> {
        thali_sys::sync::lock(&self.queue)
    }

    /// Queues `docs` for writing and waits for their results, applied together with whatever
    /// other requests are waiting.
    pub(super) async fn enqueue(
        self: &Arc<Self>,
        docs: Vec<DocInput>,
        new_edits: bool,
        ctx: WriteCtx,
    ) -> DbResult<Vec<DocResult>> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut q = self.queue();
            q.jobs.push_back(Job {
                docs: docs.into(),
                new_edits,
                ctx,
                results: Vec::new(),
                reply,
            });
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            self.start_writer();
        }
        answer
            .await
            .map_err(|_| DbError::Internal("the database's writer stopped".into()))?
    }

    fn start_writer(self: &Arc<Self>) {
        let this = self.clone();
        let span = tracing::info_span!(parent: None, "writer", db = %self.name);
        let _in = span.enter();
        crate::offload::detach(move || this.drain());
    }

    /// The writer: holds until the queue is empty, or until it has had its turn (then it
    /// queues itself for another slot).
    fn drain(self: &Arc<Self>) {
        let _clear = ClearOnPanic(self);
        for _ in 0..HOLDS_PER_SLOT {
            let mut jobs = {
                let mut q = self.queue();
                if q.jobs.is_empty() {
                    q.running = false;
                    return;
                }
                q.take()
            };
            let outcome = self
                .write_blocking(&mut jobs)
                .and_then(|hold| {
                    hold.data.durable_blocking(hold.ticket)?;
                    Ok(hold)
                })
                .map(|hold| {
                    let (seq, docs, deleted) = hold.counts;
                    self.updates.send_modify(|s| *s = (*s).max(seq));
                    // After the feed moved: whoever sees the counts finds the documents in
                    // `_changes`.
                    self.publish_counts(seq, docs, deleted);
                });
            let mut unfinished = Vec::new();
            for job in jobs {
                match &outcome {
                    Err(e) => {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                    Ok(()) if job.docs.is_empty() => {
                        let _ = job.reply.send(Ok(job.results));
                    }
                    Ok(()) => unfinished.push(job),
                }
            }
            requeue(&mut self.queue(), unfinished);
        }
        self.start_writer();
    }
}

/// Puts back the requests a hold left unfinished. The first one is the request the hold's time
/// slice ran out in: it goes behind everyone waiting, while those after it (not begun) keep
/// their place at the front. One client's batch through a slow validator thus delays
/// another's write by at most one slice.
fn requeue(q: &mut WriteQueue, unfinished: Vec<Job>) {
    let mut unfinished = unfinished.into_iter();
    let Some(cut) = unfinished.next() else {
        return;
    };
    let untouched: Vec<Job> = unfinished.collect();
    for job in untouched.into_iter().rev() {
        q.jobs.push_front(job);
    }
    q.jobs.push_back(cut);
}

/// If the writer panics, the requests still queued are answered (their senders dropped) and
/// the next request starts a new writer.
struct ClearOnPanic<'a>(&'a Database);

impl Drop for ClearOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut q = self.0.queue();
            q.jobs.clear();
            q.running = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(docs: usize, exclusive: bool) -> Job {
        let (reply, _) = oneshot::channel();
        Job {
            docs: (0..docs)
                .map(|_| Err((None, DbError::BadRequest("unused".into()))))
                .collect(),
            new_edits: true,
            ctx: WriteCtx::for_test(exclusive),
            results: Vec::new(),
            reply,
        }
    }

    fn queue(jobs: &[(usize, bool)]) -> WriteQueue {
        let mut q = WriteQueue::default();
        for &(docs, exclusive) in jobs {
            q.jobs.push_back(job(docs, exclusive));
        }
        q
    }

    fn sizes(jobs: Vec<Job>) -> Vec<usize> {
        jobs.iter().map(|j| j.docs.len()).collect()
    }

    #[test]
    fn a_hold_takes_requests_in_order_and_an_exclusive_one_alone() {
        let mut q = queue(&[(1, false), (2, false), (3, true), (4, false), (5, true)]);
        assert_eq!(sizes(q.take()), [1, 2]);
        assert_eq!(sizes(q.take()), [3]);
        assert_eq!(sizes(q.take()), [4]);
        assert_eq!(sizes(q.take()), [5]);
        assert!(q.take().is_empty());
    }

    #[test]
    fn a_request_cut_before_is_not_joined_by_others() {
        let mut q = queue(&[(1, false)]);
        let mut cut = job(30, false);
        cut.results
            .push(Err((None, None, DbError::BadRequest("x".into()))));
        q.jobs.push_back(cut);
        q.jobs.push_back(job(2, false));
        assert_eq!(sizes(q.take()), [1]);
        assert_eq!(sizes(q.take()), [30]);
        assert_eq!(sizes(q.take()), [2]);
    }

    #[test]
    fn a_request_cut_by_the_slice_goes_behind_the_waiting_ones() {
        // A hold took [40 (slow), 1]; the 40 was cut, the 1 never begun; 2 arrived meanwhile.
        let mut q = queue(&[(2, false)]);
        requeue(&mut q, vec![job(30, false), job(1, false)]);
        let order: Vec<usize> = q.jobs.iter().map(|j| j.docs.len()).collect();
        assert_eq!(order, [1, 2, 30]);
    }

    #[test]
    fn a_hold_stops_adding_requests_past_the_document_bound() {
        let mut q = queue(&[(HOLD_DOCS * 3, false), (1, false)]);
        // The first request is taken whole, however large.
        assert_eq!(sizes(q.take()), [HOLD_DOCS * 3]);
        let mut q = queue(&[(HOLD_DOCS - 1, false), (10, false), (1, false)]);
        assert_eq!(sizes(q.take()), [HOLD_DOCS - 1, 10]);
        assert_eq!(sizes(q.take()), [1]);
    }
}
