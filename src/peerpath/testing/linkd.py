"""A userspace link between two TAP devices in two namespaces, with delay, jitter,
loss and reordering: the lab's impaired link (the CI kernel has no netem).

Run as ``python -m peerpath.testing.linkd --a NS:DEV --b NS:DEV [--delay-ms ..]``. It
enters each namespace (setns), attaches to the persistent TAP device there, prints
``ready`` and forwards Ethernet frames both ways until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import fcntl
import heapq
import os
import random
import selectors
import signal
import struct
import sys
import time

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000


def _setns(path: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def open_tap(namespace: str, device: str) -> int:
    """Open the persistent TAP ``device`` inside ``namespace``; the fd stays bound to it."""
    _setns(f"/var/run/netns/{namespace}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", device.encode(), _IFF_TAP | _IFF_NO_PI))
    return fd


class Direction:
    """One direction of the link: a delay queue with loss and jitter."""

    def __init__(self, out_fd: int, delay: float, jitter: float, loss: float, reorder: bool, rng: random.Random):
        self.out_fd = out_fd
        self.delay, self.jitter, self.loss, self.reorder = delay, jitter, loss, reorder
        self.rng = rng
        self.last_due = 0.0
        self.forwarded = self.dropped = 0

    def schedule(self, frame: bytes, now: float, queue: list[tuple[float, int, int, bytes]], seq: int) -> None:
        """Queue ``frame`` for delivery, or drop it."""
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        due = now + self.delay + (self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        if not self.reorder:
            due = max(due, self.last_due)
        self.last_due = due
        heapq.heappush(queue, (due, seq, self.out_fd, frame))


def main(argv: list[str] | None = None) -> int:
    """Run the forwarder."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--a", required=True, metavar="NS:DEV")
    parser.add_argument("--b", required=True, metavar="NS:DEV")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in each direction")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- jitter")
    parser.add_argument("--loss", type=float, default=0.0, help="loss probability per frame, 0..1")
    parser.add_argument("--reorder", action="store_true", help="let jitter reorder frames")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd_a = open_tap(*args.a.split(":", 1))
    fd_b = open_tap(*args.b.split(":", 1))
    rng = random.Random(args.seed)
    delay, jitter = args.delay_ms / 1000, args.jitter_ms / 1000
    directions = {
        fd_a: Direction(fd_b, delay, jitter, args.loss, args.reorder, rng),
        fd_b: Direction(fd_a, delay, jitter, args.loss, args.reorder, rng),
    }
    selector = selectors.DefaultSelector()
    for fd in directions:
        selector.register(fd, selectors.EVENT_READ)
    queue: list[tuple[float, int, int, bytes]] = []
    seq = 0
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out_fd, frame = heapq.heappop(queue)
            # A device that is down (namespace going away) or full loses the frame.
            with contextlib.suppress(OSError):
                os.write(out_fd, frame)
        timeout = max(0.0, queue[0][0] - now) if queue else None
        for key, _ in selector.select(timeout):
            fd = int(key.fd)
            for _ in range(64):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    return 0  # the namespace was deleted
                seq += 1
                directions[fd].schedule(frame, time.monotonic(), queue, seq)


if __name__ == "__main__":
    sys.exit(main())
