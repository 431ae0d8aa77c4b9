"""service.Workers: every job runs, the thread count stays bounded, threads are daemons."""

from __future__ import annotations

import threading

from bridge.service import Workers


def test_every_job_runs_within_the_limit() -> None:
    workers = Workers(limit=8)
    done = threading.Semaphore(0)
    seen: set[str] = set()
    lock = threading.Lock()

    def job(index: int) -> None:
        with lock:
            seen.add(threading.current_thread().name + str(id(threading.current_thread())))
        done.release()

    def submit_many(offset: int) -> None:
        for index in range(300):
            workers.submit(job, offset + index)

    submitters = [threading.Thread(target=submit_many, args=(n * 1000,)) for n in range(3)]
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join()
    for _ in range(900):
        assert done.acquire(timeout=5), "a submitted job never ran"
    assert 1 <= len(seen) <= 8
    workers.shutdown()


def test_a_blocked_job_does_not_hold_the_others_and_threads_are_daemons() -> None:
    workers = Workers(limit=4)
    release = threading.Event()
    ran = threading.Event()
    workers.submit(release.wait, 10)  # a meter that hangs
    workers.submit(ran.set)
    assert ran.wait(5)
    names = [t for t in threading.enumerate() if t.name == "meter"]
    assert names and all(t.daemon for t in names)
    release.set()
    workers.shutdown()


def test_a_failing_job_does_not_kill_its_worker() -> None:
    workers = Workers(limit=1)
    ran = threading.Event()

    def boom() -> None:
        raise RuntimeError("bug")

    workers.submit(boom)
    workers.submit(ran.set)
    assert ran.wait(5)
    workers.shutdown()
