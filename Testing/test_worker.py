"""The module's worker thread: jobs run off the calling thread, in order, with progress, errors and cancel."""
import threading

from FCMSegmentationLib.worker import WORKER_THREAD_NAME, Job, Worker, shared_worker


def run(worker: Worker, job: Job, timeout: float = 10.0) -> Job:
    worker.submit(job)
    assert job.doneEvent.wait(timeout), "job did not finish"
    return job


def test_jobs_run_on_one_persistent_worker_thread_in_order():
    worker = Worker()
    seen = []
    jobs = [Job(f"job {i}", lambda progress, cancel, i=i: seen.append((i, threading.current_thread().name)))
            for i in range(5)]
    for job in jobs:
        worker.submit(job)
    for job in jobs:
        assert job.doneEvent.wait(10)
    assert [i for i, _ in seen] == list(range(5))
    assert {name for _, name in seen} == {WORKER_THREAD_NAME}
    assert threading.current_thread().name != WORKER_THREAD_NAME
    worker.stop()


def test_progress_is_visible_while_the_job_runs_and_the_caller_is_free():
    worker = Worker()
    reported, release = threading.Event(), threading.Event()

    def work(progress, cancel):
        progress(0.5, "half way")
        reported.set()
        release.wait(10)
        return "result"

    job = worker.submit(Job("slow", work))
    assert reported.wait(10)
    assert job.progress() == (0.5, "half way") and not job.doneEvent.is_set()  # the caller is not blocked
    release.set()
    assert job.doneEvent.wait(10) and job.result == "result"
    worker.stop()


def test_errors_are_captured_for_the_main_thread_and_the_worker_survives():
    worker = Worker()

    def fail(progress, cancel):
        raise ValueError("bad input")

    failed = run(worker, Job("fail", fail))
    assert isinstance(failed.error, ValueError) and "bad input" in failed.errorDetails
    assert run(worker, Job("next", lambda progress, cancel: 42)).result == 42
    worker.stop()


def test_cancel_event_reaches_the_work():
    worker = Worker()
    started = threading.Event()

    def loop(progress, cancel):
        started.set()
        while not cancel.wait(0.01):
            pass
        return "stopped"

    job = worker.submit(Job("loop", loop))
    assert started.wait(10)
    job.cancelEvent.set()
    assert job.doneEvent.wait(10) and job.result == "stopped"
    worker.stop()


def test_shared_worker_is_a_singleton():
    assert shared_worker() is shared_worker()
