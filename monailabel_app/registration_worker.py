"""Registrations in a child process that the server can stop, one at a time, behind a small queue.

Why a process and not a thread: a request that runs past ``--conf max_request_seconds`` must really end, or the one
registration slot stays taken and every later request waits behind it. Python cannot stop a thread; it can kill a
process. So the server keeps one child (``python registration_worker.py BUNDLE_ROOT``) that has torch, MONAI and the
bundle's scripts imported, sends it one job per line on its stdin (``{"config_file", "overrides"}``, JSON) and reads
one answer per line from its stdout (``{"ok": true}`` or ``{"ok": false, "type", "message", "input_error"}``). A job
past its deadline kills the child; a fresh one is started at once for the next request. The child's own output (the
bundle's logging, prints) goes to its stderr, the server's log.

Both halves of that protocol live here: ``serve`` (the child) and ``RegistrationWorker`` (the server side).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

# Errors of the bundle that describe the input (an unreadable or mismatched image, a bad option, too little memory
# for this image): the client's 422. Anything else is the server's 500.
INPUT_ERRORS = (ValueError, FileNotFoundError, MemoryError)


class RegistrationBusy(Exception):
    """The queue is full, or the request waited its whole time limit behind others: the client may retry later."""


class RegistrationTimeout(Exception):
    """The registration ran past the request's time limit and was stopped (its process killed)."""


class RegistrationFailed(Exception):
    """The bundle raised: ``input_error`` for an input the registration cannot use (422), else a server error."""

    def __init__(self, type_name: str, message: str, input_error: bool) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message, self.input_error = type_name, message, input_error


class RegistrationWorker:
    """Server side: one child process, one job at a time, at most ``max_waiting`` more requests waiting for it.

    ``run`` blocks the calling thread (a server worker thread, never the event loop) until the job's answer or its
    deadline. ``RegistrationBusy`` when the queue is full or the wait used the whole time limit,
    ``RegistrationTimeout`` when the job itself ran past it (the child is killed and replaced),
    ``RegistrationFailed`` with the bundle's error otherwise.
    """

    def __init__(self, bundle_root: str, max_waiting: int = 2) -> None:
        self.bundle_root = str(bundle_root)
        self.max_waiting = int(max_waiting)
        self._admitted = 0
        self._admission = threading.Lock()
        self._turn = threading.Lock()  # held by the one request whose job the child runs
        self._process: subprocess.Popen | None = None
        self._answers: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _start(self) -> None:
        """A fresh child; it imports torch and MONAI (seconds) while the server goes on answering."""
        self._answers, self._ready = queue.Queue(), threading.Event()
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), self.bundle_root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        threading.Thread(
            target=_read_lines,
            args=(self._process.stdout, self._answers, self._ready, self._process.pid),
            name="registration-answers",
            daemon=True,
        ).start()
        logger.info("registration worker started (pid %d)", self._process.pid)

    def stop(self) -> None:
        """Kill the child (a running job ends with it)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    def _restart(self) -> None:
        self.stop()
        self._start()

    def _answer(self, deadline: float) -> dict[str, Any] | None:
        """The child's next line as JSON; None if the deadline passes first. A child that ended raises."""
        try:
            line = self._answers.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is None:
            code = self._process.wait(timeout=30) if self._process is not None else None
            self._start()
            hint = " (killed: out of memory?)" if code == -9 else ""
            raise RegistrationFailed("RuntimeError", f"the registration process ended with code {code}{hint}", False)
        return json.loads(line)

    def run(self, config_file: str, overrides: dict[str, Any], deadline: float) -> None:
        """Run ``inference.yaml`` with ``overrides`` in the child, by ``deadline`` (``time.monotonic()``)."""
        with self._admission:
            if self._admitted >= 1 + self.max_waiting:
                raise RegistrationBusy(f"the registration queue is full ({self._admitted} running or waiting)")
            self._admitted += 1
        try:
            if not self._turn.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise RegistrationBusy("the registrations ahead of this request took its whole time limit")
            try:
                self._run(config_file, overrides, deadline)
            finally:
                self._turn.release()
        finally:
            with self._admission:
                self._admitted -= 1

    def _run(self, config_file: str, overrides: dict[str, Any], deadline: float) -> None:
        if self._process is None or self._process.poll() is not None:
            self._start()
        while not self._ready.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
            if self._process.poll() is not None:
                self._answer(deadline)  # the child's end is in its answers: raises, and starts a fresh one
            if time.monotonic() >= deadline:
                raise RegistrationBusy("the registration process is still starting")
        try:
            self._process.stdin.write(json.dumps({"config_file": config_file, "overrides": overrides}) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            self._restart()
            raise RegistrationFailed("RuntimeError", "the registration process did not take the job", False) from error
        answer = self._answer(deadline)
        if answer is None:
            logger.warning("registration past its deadline: stopping worker pid %s", self.pid)
            self._restart()
            raise RegistrationTimeout("the registration ran past the time limit and was stopped")
        if not answer.get("ok"):
            error_type, message = answer.get("type", "Error"), answer.get("message", "")
            raise RegistrationFailed(error_type, message, bool(answer.get("input_error")))


def _read_lines(stream: Any, lines: queue.Queue, ready: threading.Event, pid: int) -> None:
    """The child's stdout: its first line says it is ready (``ready`` set, logged), every later line into
    ``lines``; None at its end (the child exited)."""
    for line in stream:
        if not line.strip():
            continue
        if not ready.is_set() and json.loads(line).get("ready"):
            ready.set()
            logger.info("registration worker ready (pid %d)", pid)
            continue
        lines.put(line)
    lines.put(None)


def serve(bundle_root: str) -> None:
    """Child side: answer one job per stdin line until stdin closes (the server ended)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the bundle prints goes to the server's log, not into the answers
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [registration worker] %(levelname)s %(message)s")
    sys.path.insert(0, bundle_root)
    import scripts  # the bundle's package: its configs' _target_ need it importable, as `monai.bundle run` does
    import torch
    from monai.bundle import ConfigParser

    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        try:
            overrides = dict(job["overrides"])
            overrides["device"] = torch.device(overrides["device"])
            parser = ConfigParser()
            parser.read_config(job["config_file"])
            parser.update(overrides)
            parser.get_parsed_content("inference")
            answer: dict[str, Any] = {"ok": True}
        except Exception as error:  # every failure is answered; the server decides what the client sees
            specific = scripts._specific_error(error)  # the bundle's own message, not MONAI's config wrapper
            logging.exception("registration failed: %s: %s", type(specific).__name__, specific)
            answer = {
                "ok": False,
                "type": type(specific).__name__,
                "message": str(specific),
                "input_error": isinstance(specific, INPUT_ERRORS),
            }
        protocol.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    serve(sys.argv[1])
