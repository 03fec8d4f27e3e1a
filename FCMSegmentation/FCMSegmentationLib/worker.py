"""The single persistent worker thread that runs all torch work of the Slicer module.

torch must not run on Slicer's main thread (the GUI would freeze) and cuDNN/autotuner caches are per
thread, so every job — model loading, inference, fine-tuning, saving — goes through one thread, in
order. The main thread submits :class:`Job` objects and polls them (a ``qt.QTimer`` in Slicer); the
worker only calls the engine and never touches Qt or MRML. No Qt here: this is tested in CI.
"""
import queue
import threading
import traceback
from typing import Any, Callable, Optional, Tuple

WORKER_THREAD_NAME = "FCMSegmentationWorker"

Work = Callable[[Callable[[float, str], None], threading.Event], Any]


class Job:
    """One unit of engine work. ``work(progress, cancel)`` runs on the worker thread.

    The worker writes progress, result and error; the main thread reads them. ``progress`` is the
    engine's callback ``(fraction, message)``; ``cancel`` is a ``threading.Event`` (``is_set()``).
    """

    def __init__(self, name: str, work: Work):
        self.name = name
        self.work = work
        self.cancelEvent = threading.Event()
        self.doneEvent = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.errorDetails = ""
        self._lock = threading.Lock()
        self._progress: Tuple[float, str] = (0.0, "waiting")

    def report(self, fraction: float, message: str) -> None:
        """The engine's progress callback (worker thread): store the latest value only."""
        with self._lock:
            self._progress = (float(fraction), str(message))

    def progress(self) -> Tuple[float, str]:
        with self._lock:
            return self._progress


class Worker:
    """A persistent thread running submitted jobs one at a time, in order (started on first submit)."""

    def __init__(self):
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._startLock = threading.Lock()

    def submit(self, job: Job) -> Job:
        with self._startLock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=WORKER_THREAD_NAME, daemon=True)
                self._thread.start()
        self._jobs.put(job)
        return job

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.result = job.work(job.report, job.cancelEvent)
            except Exception as err:  # handed to the main thread, which shows it
                job.error = err
                job.errorDetails = traceback.format_exc()
            finally:
                job.doneEvent.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Let the thread finish its queue and exit (used at application shutdown and in tests)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            thread.join(timeout)


_SHARED: Optional[Worker] = None


def shared_worker() -> Worker:
    """The process-wide worker (created on first use)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = Worker()
    return _SHARED
