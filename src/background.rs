//! Work on threads of their own that the caller does not wait for (loading a cache ahead
//! of need, freeing a large tree), and the one place that does wait for them: before the
//! container runtime creates a process with a raw `clone`/`fork`. Such a child may only
//! rely on locks no other thread held at that moment (the allocator's among them), so the
//! runtime calls [`settle`] first and berth is single-threaded when it forks.

use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;

/// Threads started by [`spawn`] and not yet joined.
static PENDING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
/// How many [`spawn_kept`] tasks have not finished, and word when one does.
static KEPT: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// Runs `work` like [`spawn`], for work whose result must outlive the process (a cache
/// file written): [`finish`], at the end of `main`, waits for it.
pub fn spawn_kept(work: impl FnOnce() + Send + 'static) {
    *KEPT.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    let done = Done;
    spawn(move || {
        let _done = done;
        work();
    });
}

/// Marks a [`spawn_kept`] task finished when dropped (also if it panicked).
struct Done;

impl Drop for Done {
    fn drop(&mut self) {
        let mut left = KEPT.0.lock().unwrap_or_else(|e| e.into_inner());
        *left -= 1;
        KEPT.1.notify_all();
    }
}

/// Waits for the [`spawn_kept`] tasks (the others may be abandoned: the process is ending).
pub fn finish() {
    let mut left = KEPT.0.lock().unwrap_or_else(|e| e.into_inner());
    while *left > 0 {
        left = KEPT.1.wait(left).unwrap_or_else(|e| e.into_inner());
    }
}

/// Runs `work` on a thread of its own. If no thread can be started, it runs here.
pub fn spawn(work: impl FnOnce() + Send + 'static) {
    // The closure comes back only through the error path, so it runs inline then.
    let work = std::sync::Arc::new(Mutex::new(Some(work)));
    let theirs = std::sync::Arc::clone(&work);
    let started = std::thread::Builder::new().spawn(move || {
        // Below the threads the caller waits for: on a machine with few cores, work ahead
        // of need must not slow the work that is needed now.
        // SAFETY: setpriority on this thread's own id; it reads no memory of ours.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
        }
        if let Some(work) = theirs.lock().ok().and_then(|mut w| w.take()) {
            work();
        }
    });
    match started {
        Ok(handle) => {
            let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
            pending.retain(|h| !h.is_finished());
            pending.push(handle);
        }
        Err(_) => {
            if let Some(work) = work.lock().ok().and_then(|mut w| w.take()) {
                work();
            }
        }
    }
}

/// A value computed by [`spawn`] while the caller goes on, and waited for when first
/// asked. A computation that panicked gives the type's default (what the caches using this
/// do with a file they cannot read).
pub struct Later<T> {
    value: std::sync::OnceLock<T>,
    coming: Mutex<Option<std::sync::mpsc::Receiver<T>>>,
}

impl<T: Default + Send + 'static> Later<T> {
    /// Starts computing the value.
    pub fn spawn(work: impl FnOnce() -> T + Send + 'static) -> Later<T> {
        let (tx, coming) = std::sync::mpsc::channel();
        spawn(move || {
            let _ = tx.send(work());
        });
        Later {
            value: std::sync::OnceLock::new(),
            coming: Mutex::new(Some(coming)),
        }
    }

    /// The value, once computed.
    pub fn get(&self) -> &T {
        self.value.get_or_init(|| {
            let coming = self.coming.lock().map(|mut c| c.take()).ok().flatten();
            coming.and_then(|c| c.recv().ok()).unwrap_or_default()
        })
    }

    /// The value, once computed, to change.
    pub fn get_mut(&mut self) -> &mut T {
        self.get();
        self.value.get_mut().expect("computed above")
    }
}

/// Waits until every thread [`spawn`] started has ended.
pub fn settle() {
    loop {
        let handles = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|e| e.into_inner()));
        if handles.is_empty() {
            return;
        }
        for h in handles {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn settle_waits_for_every_thread_and_what_they_started() {
        static DONE: AtomicUsize = AtomicUsize::new(0);
        for _ in 0..4 {
            spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                // One started from a background thread is waited for too.
                spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    DONE.fetch_add(1, Ordering::SeqCst);
                });
                DONE.fetch_add(1, Ordering::SeqCst);
            });
        }
        settle();
        assert_eq!(DONE.load(Ordering::SeqCst), 8);
    }

    #[test]
    fn finish_waits_for_kept_work() {
        static WRITTEN: AtomicUsize = AtomicUsize::new(0);
        for _ in 0..3 {
            spawn_kept(|| {
                std::thread::sleep(std::time::Duration::from_millis(40));
                WRITTEN.fetch_add(1, Ordering::SeqCst);
            });
        }
        finish();
        assert_eq!(WRITTEN.load(Ordering::SeqCst), 3);
    }
}
