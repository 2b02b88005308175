//! The queue between a sink's [`submit`](crate::events::EventSink::submit)
//! and its writer thread, shared by the file log and the PostgreSQL trail:
//! entries wait here until the writer takes them as one group (group
//! commit), and a queue that is closed takes no more.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::events::Completion;

/// Entries waiting for the writer thread.
#[derive(Default)]
pub(super) struct Queue {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

#[derive(Default)]
struct Jobs {
    pending: VecDeque<Job>,
    closed: bool,
}

/// One submitted entry: its event's JSON, and who waits for it.
pub(super) struct Job {
    pub(super) event_json: String,
    pub(super) done: Completion,
}

impl Queue {
    fn jobs(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one entry for the writer; `Err` (the entry dropped, which
    /// answers its receipt with an error) once the queue is closed.
    pub(super) fn push(&self, event_json: String, done: Completion) -> Result<(), ()> {
        let mut jobs = self.jobs();
        if jobs.closed {
            return Err(());
        }
        jobs.pending.push_back(Job { event_json, done });
        drop(jobs);
        self.ready.notify_one();
        Ok(())
    }

    /// Waits for entries and takes up to `max` of them as one group;
    /// `None` once the queue is closed and empty (the writer stops).
    pub(super) fn take_group(&self, max: usize) -> Option<Vec<Job>> {
        let mut jobs = self.jobs();
        while jobs.pending.is_empty() && !jobs.closed {
            jobs = self.ready.wait(jobs).unwrap_or_else(|p| p.into_inner());
        }
        if jobs.pending.is_empty() {
            return None;
        }
        let n = jobs.pending.len().min(max);
        Some(jobs.pending.drain(..n).collect())
    }

    /// Takes no more entries; the writer finishes what is queued, then
    /// stops.
    pub(super) fn close(&self) {
        self.jobs().closed = true;
        self.ready.notify_all();
    }

    /// For the writer thread to hold: if the thread unwinds, nothing will
    /// write what is queued, so the queue is closed (later entries are
    /// refused at once) and what waits is answered with an error (dropping
    /// a completion does).
    pub(super) fn closed_on_unwind(&self) -> ClosedOnUnwind<'_> {
        ClosedOnUnwind(self)
    }
}

/// See [`Queue::closed_on_unwind`].
pub(super) struct ClosedOnUnwind<'q>(&'q Queue);

impl Drop for ClosedOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut jobs = self.0.jobs();
            jobs.closed = true;
            let waiting: Vec<Job> = jobs.pending.drain(..).collect();
            drop(jobs);
            drop(waiting);
            self.0.ready.notify_all();
        }
    }
}
