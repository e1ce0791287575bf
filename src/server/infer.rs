//! The inference queue, as text-embeddings-inference serves models: one dedicated thread owns
//! the models and is the only one to run a forward pass. Requests are messages with a reply
//! channel on a bounded queue (full: `429`); the worker takes interactive requests before
//! background ingestion, batches what is waiting (query texts together, ITM pairs of several
//! searches together, images together), drops requests whose caller has given up, and survives a
//! panic in a forward pass.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use crossbeam_channel::{bounded, select, Receiver, RecvTimeoutError, Sender, TrySendError};
use image::DynamicImage;

use super::metrics::Metrics;
use crate::engine::models::{CapFiltCandidate, CapFiltJob, ItmScore};
use crate::engine::{EncodedImages, EncodedText, Encoders, EngineError, LocalModels, Result};

/// Most query texts encoded in one forward pass.
const MAX_TEXT_BATCH: usize = 32;
/// Most images encoded in one forward pass.
const MAX_IMAGE_BATCH: usize = 8;
/// Most ITM pairs (all waiting searches together) in one forward pass.
const MAX_ITM_BATCH: usize = 64;

type Reply<T> = Sender<Result<T>>;

enum Work {
    Texts(Vec<String>, Reply<Vec<EncodedText>>),
    Images(Vec<DynamicImage>, Reply<EncodedImages>),
    Itm(String, Tensor, Reply<Vec<ItmScore>>),
    CapFilt(CapFiltJob, Reply<Vec<Vec<CapFiltCandidate>>>),
}

impl Work {
    fn kind(&self) -> &'static str {
        match self {
            Self::Texts(..) => "text",
            Self::Images(..) => "image",
            Self::Itm(..) => "itm",
            Self::CapFilt(..) => "capfilt",
        }
    }
}

struct Job {
    work: Work,
    enqueued: Instant,
    /// After this the caller has stopped waiting: the work is skipped.
    deadline: Option<Instant>,
}

/// Settings of the queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Interactive requests that may wait; more are refused with `429`.
    pub capacity: usize,
    /// How long an interactive request waits for its answer, queueing included.
    pub timeout: Duration,
}

/// The worker thread and the way to reach it.
pub struct InferenceQueue {
    interactive: Sender<Job>,
    background: Sender<Job>,
    worker: Option<JoinHandle<()>>,
    alive: Arc<AtomicBool>,
    can_caption: bool,
    config: QueueConfig,
    metrics: Arc<Metrics>,
}

impl InferenceQueue {
    /// Moves `models` onto a new worker thread.
    pub fn start(models: LocalModels, config: QueueConfig, metrics: Arc<Metrics>) -> Self {
        let (interactive, interactive_rx) = bounded(config.capacity.max(1));
        // Background work (folder ingestion) sends one batch at a time and waits for it.
        let (background, background_rx) = bounded(1);
        let alive = Arc::new(AtomicBool::new(true));
        let can_caption = models.can_caption();
        let worker = {
            let alive = alive.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("blip-inference".into())
                .spawn(move || {
                    Worker {
                        models,
                        interactive: interactive_rx,
                        background: background_rx,
                        pending: VecDeque::new(),
                        metrics,
                    }
                    .run();
                    alive.store(false, Ordering::SeqCst);
                })
                .ok()
        };
        if worker.is_none() {
            alive.store(false, Ordering::SeqCst);
        }
        Self {
            interactive,
            background,
            worker,
            alive,
            can_caption,
            config,
            metrics,
        }
    }

    /// A client for requests made on behalf of API callers: bounded wait, refused when full.
    pub fn client(&self) -> InferClient {
        InferClient {
            tx: self.interactive.clone(),
            timeout: Some(self.config.timeout),
            deadline: None,
            interactive: true,
            can_caption: self.can_caption,
            metrics: self.metrics.clone(),
        }
    }

    /// A client for background ingestion: waits for its turn, as long as it takes.
    pub fn background_client(&self) -> InferClient {
        InferClient {
            tx: self.background.clone(),
            timeout: None,
            deadline: None,
            interactive: false,
            can_caption: self.can_caption,
            metrics: self.metrics.clone(),
        }
    }

    /// Whether the worker thread is running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Interactive requests waiting.
    pub fn waiting(&self) -> usize {
        self.interactive.len()
    }

    /// Its capacity.
    pub fn capacity(&self) -> usize {
        self.config.capacity
    }

    /// Stops the worker once every client is gone and joins it.
    pub fn shutdown(mut self) {
        let worker = self.worker.take();
        drop(self);
        if let Some(w) = worker {
            let _ = w.join();
        }
    }
}

/// Sends work to the inference thread; implements [`Encoders`], so the engine's search and
/// ingestion run unchanged on top of the queue.
///
/// Each call waits at most the queue's timeout; a client [`for_request`](Self::for_request)
/// also ends every call by the request's deadline, however many calls the request makes.
#[derive(Clone)]
pub struct InferClient {
    tx: Sender<Job>,
    timeout: Option<Duration>,
    /// When set, no call waits past it.
    deadline: Option<Instant>,
    interactive: bool,
    can_caption: bool,
    metrics: Arc<Metrics>,
}

impl InferClient {
    /// This client for one request that began at `started`: all its calls together end within
    /// the timeout (a search's ITM rounds, say), not each call on its own. A background client
    /// has no timeout and is returned as it is.
    pub fn for_request(&self, started: Instant) -> Self {
        Self {
            deadline: self.timeout.map(|t| started + t),
            ..self.clone()
        }
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Work) -> Result<T> {
        let now = Instant::now();
        let deadline = match (self.timeout.map(|t| now + t), self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timed_out = || {
            EngineError::TimedOut(format!(
                "no answer from the models within {:.0} s",
                self.timeout.unwrap_or_default().as_secs_f64()
            ))
        };
        if deadline.is_some_and(|d| d <= now) {
            return Err(timed_out());
        }
        let (reply, rx) = bounded(1);
        let job = Job {
            work: make(reply),
            enqueued: now,
            deadline,
        };
        let gone = || EngineError::Internal("the inference worker has stopped".into());
        if self.interactive {
            match self.tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.metrics.rejected.inc();
                    return Err(EngineError::Busy(
                        "the inference queue is full; retry shortly".into(),
                    ));
                }
                Err(TrySendError::Disconnected(_)) => return Err(gone()),
            }
        } else {
            self.tx.send(job).map_err(|_| gone())?;
        }
        match deadline {
            None => rx.recv().map_err(|_| gone())?,
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(now)) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => Err(timed_out()),
                Err(RecvTimeoutError::Disconnected) => Err(gone()),
            },
        }
    }
}

impl Encoders for InferClient {
    fn encode_images(&self, images: Vec<DynamicImage>) -> Result<EncodedImages> {
        self.call(|r| Work::Images(images, r))
    }

    fn encode_texts(&self, texts: Vec<String>) -> Result<Vec<EncodedText>> {
        self.call(|r| Work::Texts(texts, r))
    }

    /// Sent in jobs of at most [`MAX_ITM_BATCH`] pairs, each after the last is answered: the
    /// worker serves jobs in turn, so other searches' jobs go between them and no search holds
    /// the models for longer than one batch at a time.
    fn itm(&self, text: String, tokens: Tensor) -> Result<Vec<ItmScore>> {
        let n = tokens.dim(0).map_err(EngineError::from)?;
        if n <= MAX_ITM_BATCH {
            return self.call(|r| Work::Itm(text, tokens, r));
        }
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(MAX_ITM_BATCH) {
            let part = tokens
                .narrow(0, start, MAX_ITM_BATCH.min(n - start))
                .map_err(EngineError::from)?;
            out.extend(self.call(|r| Work::Itm(text.clone(), part, r))?);
        }
        Ok(out)
    }

    fn capfilt(&self, job: CapFiltJob) -> Result<Vec<Vec<CapFiltCandidate>>> {
        self.call(|reply| Work::CapFilt(job, reply))
    }

    fn can_caption(&self) -> bool {
        self.can_caption
    }
}

struct Worker {
    models: LocalModels,
    interactive: Receiver<Job>,
    background: Receiver<Job>,
    pending: VecDeque<Job>,
    metrics: Arc<Metrics>,
}

/// Runs `f`, turning a panic into an error so that one bad input cannot take the worker down.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(%what, "panic in a forward pass");
        Err(EngineError::Internal(format!(
            "panic in a forward pass: {what}"
        )))
    })
}

/// Answers every job of a failed batch: a batch of one gets the error itself (so that a bad
/// input stays a bad input), the jobs of a larger batch an internal error naming it.
fn fail_all<T>(mut replies: Vec<Reply<T>>, e: EngineError) {
    if replies.len() == 1 {
        if let Some(r) = replies.pop() {
            let _ = r.send(Err(e));
        }
        return;
    }
    for r in replies {
        let _ = r.send(Err(EngineError::Internal(format!("batch failed: {e}"))));
    }
}

impl Worker {
    fn run(mut self) {
        let mut background_open = true;
        loop {
            while let Ok(j) = self.interactive.try_recv() {
                self.pending.push_back(j);
            }
            let job = match self.pending.pop_front() {
                Some(j) => j,
                None => {
                    let next = if background_open {
                        select! {
                            recv(self.interactive) -> j => j.ok().map(Some).unwrap_or(None),
                            recv(self.background) -> j => match j {
                                Ok(j) => Some(j),
                                Err(_) => { background_open = false; continue; }
                            },
                        }
                    } else {
                        self.interactive.recv().ok()
                    };
                    match next {
                        Some(j) => j,
                        None => break, // every client is gone: shut down
                    }
                }
            };
            self.process(job);
        }
        tracing::debug!("inference worker stopped");
    }

    /// Takes the jobs of the same kind as `first` from the pending list (up to `max` units).
    fn gather(&mut self, first: Job, units: impl Fn(&Work) -> usize, max: usize) -> Vec<Job> {
        let kind = first.work.kind();
        let mut total = units(&first.work);
        let mut out = vec![first];
        let mut rest = VecDeque::with_capacity(self.pending.len());
        while let Some(j) = self.pending.pop_front() {
            let n = units(&j.work);
            if j.work.kind() == kind && total + n <= max {
                total += n;
                out.push(j);
            } else {
                rest.push_back(j);
            }
        }
        self.pending = rest;
        out
    }

    fn process(&mut self, first: Job) {
        let kind = first.work.kind();
        let jobs = match &first.work {
            Work::Texts(..) => self.gather(
                first,
                |w| match w {
                    Work::Texts(t, _) => t.len(),
                    _ => 0,
                },
                MAX_TEXT_BATCH,
            ),
            Work::Itm(..) => self.gather(
                first,
                |w| match w {
                    Work::Itm(_, t, _) => t.dim(0).unwrap_or(1),
                    _ => 0,
                },
                MAX_ITM_BATCH,
            ),
            Work::Images(..) => self.gather(
                first,
                |w| match w {
                    Work::Images(i, _) => i.len(),
                    _ => 0,
                },
                MAX_IMAGE_BATCH,
            ),
            Work::CapFilt(..) => vec![first],
        };
        let now = Instant::now();
        let mut live = Vec::with_capacity(jobs.len());
        for j in jobs {
            self.metrics
                .queue_seconds
                .with_label_values(&[kind])
                .observe((now - j.enqueued).as_secs_f64());
            if j.deadline.is_some_and(|d| d <= now) {
                continue; // the caller has given up and been told so
            }
            live.push(j.work);
        }
        if live.is_empty() {
            return;
        }
        let started = Instant::now();
        let units = match kind {
            "text" => self.run_texts(live),
            "itm" => self.run_itm(live),
            "image" => self.run_images(live),
            _ => self.run_capfilt(live),
        };
        self.metrics
            .infer_seconds
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .batch_size
            .with_label_values(&[kind])
            .observe(units as f64);
    }

    fn run_texts(&self, work: Vec<Work>) -> usize {
        let (texts, replies) = concat(work, |w| match w {
            Work::Texts(t, r) => Some((t, r)),
            _ => None,
        });
        let n = texts.len();
        match guarded(|| self.models.encode_texts(texts)) {
            Ok(all) => {
                let mut all = all.into_iter();
                for (len, r) in replies {
                    let _ = r.send(Ok(all.by_ref().take(len).collect()));
                }
            }
            Err(e) => fail_all(replies.into_iter().map(|x| x.1).collect(), e),
        }
        n
    }

    fn run_images(&self, work: Vec<Work>) -> usize {
        let (images, replies) = concat(work, |w| match w {
            Work::Images(i, r) => Some((i, r)),
            _ => None,
        });
        let n = images.len();
        let result = guarded(|| {
            let enc = self.models.encode_images(images)?;
            let mut out = Vec::with_capacity(replies.len());
            let mut start = 0;
            for (len, _) in &replies {
                let tokens = enc
                    .tokens
                    .narrow(0, start, *len)
                    .map_err(EngineError::from)?;
                out.push(EncodedImages {
                    itc: enc.itc[start..start + len].to_vec(),
                    tokens,
                });
                start += len;
            }
            Ok(out)
        });
        match result {
            Ok(parts) => {
                for ((_, r), p) in replies.into_iter().zip(parts) {
                    let _ = r.send(Ok(p));
                }
            }
            Err(e) => fail_all(replies.into_iter().map(|x| x.1).collect(), e),
        }
        n
    }

    fn run_itm(&self, work: Vec<Work>) -> usize {
        let mut jobs = Vec::new();
        let mut replies = Vec::new();
        for w in work {
            if let Work::Itm(text, t, r) = w {
                jobs.push((text, t));
                replies.push(r);
            }
        }
        let pairs = jobs.iter().map(|(_, t)| t.dim(0).unwrap_or(0)).sum();
        match guarded(|| self.models.itm_batch(jobs)) {
            Ok(parts) => {
                for (r, p) in replies.into_iter().zip(parts) {
                    let _ = r.send(Ok(p));
                }
            }
            Err(e) => fail_all(replies, e),
        }
        pairs
    }

    fn run_capfilt(&self, work: Vec<Work>) -> usize {
        let mut n = 0;
        for w in work {
            if let Work::CapFilt(job, reply) = w {
                n += job.images.len();
                let r = guarded(|| self.models.capfilt(job));
                let _ = reply.send(r);
            }
        }
        n
    }
}

/// The items of the jobs that `take` accepts, concatenated into one batch, with each job's item
/// count and reply (to hand each its share of the batch's answer).
fn concat<T, R>(
    work: Vec<Work>,
    take: impl Fn(Work) -> Option<(Vec<T>, Reply<R>)>,
) -> (Vec<T>, Vec<(usize, Reply<R>)>) {
    let mut items = Vec::new();
    let mut replies = Vec::new();
    for (part, reply) in work.into_iter().filter_map(take) {
        replies.push((part.len(), reply));
        items.extend(part);
    }
    (items, replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's side of the queue, against a queue nobody serves: a full queue refuses at
    /// once, a queued request gives up at its deadline, a gone worker is an internal error.
    #[test]
    fn full_queue_refuses_and_waiting_times_out() {
        let (tx, rx) = bounded(1);
        let client = InferClient {
            tx,
            timeout: Some(Duration::from_millis(300)),
            deadline: None,
            interactive: true,
            can_caption: false,
            metrics: Arc::new(Metrics::new()),
        };
        let queued = {
            let c = client.clone();
            std::thread::spawn(move || c.encode_texts(vec!["first".into()]))
        };
        while rx.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let busy = client.encode_texts(vec!["second".into()]);
        assert!(
            matches!(busy, Err(EngineError::Busy(_))),
            "{:?}",
            busy.err()
        );
        assert_eq!(client.metrics.rejected.get(), 1);
        let waited = queued.join().unwrap();
        assert!(
            matches!(waited, Err(EngineError::TimedOut(_))),
            "{:?}",
            waited.err()
        );
        drop(rx);
        let gone = client.encode_texts(vec!["third".into()]);
        assert!(
            matches!(gone, Err(EngineError::Internal(_))),
            "{:?}",
            gone.err()
        );
    }

    /// A deep rerank's ITM goes to the worker in jobs of at most MAX_ITM_BATCH pairs, the next
    /// sent only once the last is answered (so other searches' jobs are served in between), and
    /// the answers come back in order.
    #[test]
    fn large_itm_calls_go_in_turns_of_one_batch() {
        let (tx, rx) = bounded(8);
        let client = InferClient {
            tx,
            timeout: Some(Duration::from_secs(60)),
            deadline: None,
            interactive: true,
            can_caption: false,
            metrics: Arc::new(Metrics::new()),
        };
        let n = 2 * MAX_ITM_BATCH + 22;
        let caller = std::thread::spawn(move || {
            let tokens = Tensor::zeros(
                (n, 2, 3),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            client.itm("a query".into(), tokens)
        });
        let mut start = 0;
        for want in [MAX_ITM_BATCH, MAX_ITM_BATCH, 22] {
            let job = rx.recv_timeout(Duration::from_secs(30)).unwrap();
            let Work::Itm(text, tokens, reply) = job.work else {
                panic!("an ITM job");
            };
            assert_eq!((text.as_str(), tokens.dim(0).unwrap()), ("a query", want));
            // Nothing more is sent while this job is unanswered.
            std::thread::sleep(Duration::from_millis(50));
            assert!(rx.is_empty());
            let scores = (start..start + want)
                .map(|i| ItmScore {
                    logits: [0.0, i as f32],
                    prob: 0.5,
                })
                .collect();
            reply.send(Ok(scores)).unwrap();
            start += want;
        }
        let got = caller.join().unwrap().unwrap();
        let order: Vec<f32> = got.iter().map(|s| s.logits[1]).collect();
        assert_eq!(order, (0..n).map(|i| i as f32).collect::<Vec<_>>());
        assert!(rx.is_empty());
    }

    /// A client for one request ends every call by the request's deadline: a call made after
    /// it fails at once without queueing, and a call before it carries it to the worker.
    #[test]
    fn a_request_deadline_bounds_all_its_calls() {
        let (tx, rx) = bounded(8);
        let timeout = Duration::from_secs(60);
        let client = InferClient {
            tx,
            timeout: Some(timeout),
            deadline: None,
            interactive: true,
            can_caption: false,
            metrics: Arc::new(Metrics::new()),
        };
        let late = client.for_request(Instant::now() - timeout);
        let r = late.encode_texts(vec!["too late".into()]);
        assert!(matches!(r, Err(EngineError::TimedOut(_))), "{:?}", r.err());
        assert!(rx.is_empty(), "nothing queued after the deadline");

        let started = Instant::now() - Duration::from_secs(30);
        let request = client.for_request(started);
        let caller = std::thread::spawn(move || request.encode_texts(vec!["in time".into()]));
        let job = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(
            job.deadline,
            Some(started + timeout),
            "the request's, not a fresh one"
        );
        let Work::Texts(_, reply) = job.work else {
            panic!("a text job");
        };
        reply.send(Ok(Vec::new())).unwrap();
        assert!(caller.join().unwrap().unwrap().is_empty());
    }
}
