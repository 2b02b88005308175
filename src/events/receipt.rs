//! [`Receipt`]: the answer of a sink that records in the background, as a
//! future (std only: a mutex, a waker and a condition variable).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::SinkError;

/// What a sink answers when it is given an event through
/// [`EventSink::submit`](super::EventSink::submit): a future that resolves
/// once the event is recorded (for the durable
/// [`AuditLog`](crate::audit::AuditLog): written and on stable storage),
/// or with the error that kept it from being recorded.
///
/// Awaiting it holds no thread: the task is woken when the sink's writer
/// finishes. Outside async code, [`wait`](Self::wait) blocks the calling
/// thread instead (never call it from async code). Dropping a receipt
/// does not withdraw the event: the sink still records it.
#[must_use = "a receipt says whether the event was recorded"]
#[derive(Debug)]
pub struct Receipt(Kind);

#[derive(Debug)]
enum Kind {
    /// Answered at once (a sink that records inline), or already taken.
    Ready(Option<Result<(), SinkError>>),
    /// Answered later through a [`Completion`].
    Pending(Arc<Slot>),
}

/// The other end of a pending [`Receipt`]: whoever records the event
/// completes it. Dropped without [`complete`](Self::complete) (a writer
/// that stopped), it completes the receipt with an error, so a receipt
/// never waits forever.
#[derive(Debug)]
pub struct Completion(Option<Arc<Slot>>);

#[derive(Debug, Default)]
struct Slot {
    state: Mutex<SlotState>,
    done: Condvar,
}

/// A function run once when a receipt is answered.
type Callback = Box<dyn FnOnce(Result<(), SinkError>) + Send>;

#[derive(Default)]
struct SlotState {
    result: Option<Result<(), SinkError>>,
    /// The receipt's answer was taken (polled to completion or handed to a
    /// callback).
    taken: bool,
    waker: Option<Waker>,
    callback: Option<Callback>,
}

impl std::fmt::Debug for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotState")
            .field("answered", &self.result.is_some())
            .finish_non_exhaustive()
    }
}

fn lock(slot: &Slot) -> MutexGuard<'_, SlotState> {
    slot.state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Receipt {
    /// A receipt answered already: what a sink that records inline returns
    /// (the default [`EventSink::submit`](super::EventSink::submit)).
    pub fn ready(result: Result<(), SinkError>) -> Receipt {
        Receipt(Kind::Ready(Some(result)))
    }

    /// A receipt to be answered later, and the [`Completion`] that answers
    /// it: for sinks that record on a thread of their own.
    pub fn pending() -> (Receipt, Completion) {
        let slot = Arc::new(Slot::default());
        (Receipt(Kind::Pending(slot.clone())), Completion(Some(slot)))
    }

    /// Blocks the calling thread until the receipt is answered. For code
    /// that is not async (the synchronous [`EventSink::record`](super::EventSink::record)
    /// of a background sink); in async code, `.await` the receipt instead.
    pub fn wait(self) -> Result<(), SinkError> {
        match self.0 {
            Kind::Ready(r) => r.unwrap_or_else(|| Err(taken())),
            Kind::Pending(slot) => {
                let mut st = lock(&slot);
                loop {
                    if let Some(r) = st.result.take() {
                        st.taken = true;
                        return r;
                    }
                    if st.taken {
                        return Err(taken());
                    }
                    st = slot.done.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// Runs `f` with the answer once it is known: at once if it is, else
    /// on the thread that answers it. For places that cannot await (a
    /// drop), and to combine receipts. `f` must be quick and must not
    /// block: it may run on a sink's writer thread, which answers nothing
    /// else while `f` runs (a panic in `f` is contained).
    pub fn on_complete(self, f: impl FnOnce(Result<(), SinkError>) + Send + 'static) {
        match self.0 {
            Kind::Ready(r) => f(r.unwrap_or_else(|| Err(taken()))),
            Kind::Pending(slot) => {
                let mut st = lock(&slot);
                if let Some(r) = st.result.take() {
                    st.taken = true;
                    drop(st);
                    f(r);
                } else {
                    st.callback = Some(Box::new(f));
                }
            }
        }
    }

    /// One receipt for several: answered once all are, with the first
    /// error (in the order given) if any failed.
    pub fn all(receipts: Vec<Receipt>) -> Receipt {
        if receipts.iter().all(|r| matches!(r.0, Kind::Ready(Some(_)))) {
            let mut first = Ok(());
            for r in receipts {
                if let (Kind::Ready(Some(Err(e))), Ok(())) = (r.0, &first) {
                    first = Err(e);
                }
            }
            return Receipt::ready(first);
        }
        let (receipt, completion) = Receipt::pending();
        let n = receipts.len();
        let shared = Arc::new(Mutex::new((n, vec![None; n], Some(completion))));
        for (i, r) in receipts.into_iter().enumerate() {
            let shared = shared.clone();
            r.on_complete(move |result| {
                let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
                g.0 -= 1;
                if let Err(e) = result {
                    g.1[i] = Some(e.0);
                }
                if g.0 == 0 {
                    let first = g.1.iter_mut().find_map(Option::take);
                    if let Some(c) = g.2.take() {
                        c.complete(first.map_or(Ok(()), |m| Err(SinkError(m))));
                    }
                }
            });
        }
        receipt
    }
}

fn taken() -> SinkError {
    SinkError("the receipt was already answered".into())
}

impl Future for Receipt {
    type Output = Result<(), SinkError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Kind::Ready(r) => Poll::Ready(r.take().unwrap_or_else(|| Err(taken()))),
            Kind::Pending(slot) => {
                let mut st = lock(slot);
                if let Some(r) = st.result.take() {
                    st.taken = true;
                    return Poll::Ready(r);
                }
                if st.taken {
                    return Poll::Ready(Err(taken()));
                }
                match &st.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => st.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl Completion {
    /// Answers the receipt: wakes the task awaiting it, or the thread in
    /// [`Receipt::wait`], or runs its [`on_complete`](Receipt::on_complete)
    /// function (on this thread).
    pub fn complete(mut self, result: Result<(), SinkError>) {
        if let Some(slot) = self.0.take() {
            answer(&slot, result);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            answer(
                &slot,
                Err(SinkError(
                    "the sink stopped before it recorded the event".into(),
                )),
            );
        }
    }
}

/// Answers the receipt. Whatever its owner attached (an `on_complete`
/// function, a waker) runs here, on the answering thread (for the audit
/// log, its writer thread): a panic in it is contained, so that it cannot
/// take that thread, and every later receipt it would answer, down.
fn answer(slot: &Slot, result: Result<(), SinkError>) {
    let mut st = lock(slot);
    if let Some(f) = st.callback.take() {
        st.taken = true;
        drop(st);
        contained(move || f(result));
        return;
    }
    st.result = Some(result);
    let waker = st.waker.take();
    drop(st);
    slot.done.notify_all();
    if let Some(w) = waker {
        contained(move || w.wake());
    }
}

/// Runs `f`, stopping a panic in it at this frame (the default hook has
/// already reported it).
fn contained(f: impl FnOnce()) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    /// A waker that counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(r: &mut Receipt, waker: &Waker) -> Poll<Result<(), SinkError>> {
        Pin::new(r).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn a_pending_receipt_wakes_its_task_once_answered() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let (mut r, done) = Receipt::pending();
        assert!(poll(&mut r, &waker).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        done.complete(Err(SinkError("disk full".into())));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(matches!(poll(&mut r, &waker), Poll::Ready(Err(e)) if e.0 == "disk full"));
        // Polled again after its answer: an error, never a second `Ok`.
        assert!(matches!(poll(&mut r, &waker), Poll::Ready(Err(_))));
    }

    #[test]
    fn a_dropped_completion_answers_with_an_error() {
        let (mut r, done) = Receipt::pending();
        drop(done);
        assert!(matches!(
            poll(&mut r, Waker::noop()),
            Poll::Ready(Err(e)) if e.0.contains("stopped")
        ));
        let (r, done) = Receipt::pending();
        drop(done);
        assert!(r.wait().is_err());
    }

    #[test]
    fn wait_blocks_until_another_thread_answers() {
        let (r, done) = Receipt::pending();
        let t = std::thread::spawn(move || done.complete(Ok(())));
        r.wait().unwrap();
        t.join().unwrap();
    }

    #[test]
    fn on_complete_runs_once_before_or_after_the_answer() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (r, done) = Receipt::pending();
        let s = seen.clone();
        r.on_complete(move |res| s.lock().unwrap().push(("later", res.is_ok())));
        assert!(seen.lock().unwrap().is_empty());
        done.complete(Ok(()));
        let (r, done) = Receipt::pending();
        done.complete(Err(SinkError("no".into())));
        let s = seen.clone();
        r.on_complete(move |res| s.lock().unwrap().push(("already", res.is_ok())));
        let s = seen.clone();
        Receipt::ready(Ok(()))
            .on_complete(move |res| s.lock().unwrap().push(("ready", res.is_ok())));
        assert_eq!(
            *seen.lock().unwrap(),
            [("later", true), ("already", false), ("ready", true)]
        );
    }

    #[test]
    fn all_answers_once_every_receipt_has_with_the_first_error_in_order() {
        assert!(Receipt::all(Vec::new()).wait().is_ok());
        let (a, da) = Receipt::pending();
        let (b, db) = Receipt::pending();
        let c = Receipt::ready(Err(SinkError("third".into())));
        let mut all = Receipt::all(vec![a, b, c]);
        assert!(poll(&mut all, Waker::noop()).is_pending());
        db.complete(Err(SinkError("second".into())));
        assert!(poll(&mut all, Waker::noop()).is_pending());
        da.complete(Ok(()));
        assert!(matches!(
            poll(&mut all, Waker::noop()),
            Poll::Ready(Err(e)) if e.0 == "second"
        ));
        let ok = Receipt::all(vec![Receipt::ready(Ok(())), Receipt::ready(Ok(()))]);
        assert!(ok.wait().is_ok());
    }
}
