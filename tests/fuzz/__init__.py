"""Fuzzing the sidecar's NBD server and the control sockets (issue 6).

Targets, each a function of one input (bytes a client sends):

- ``nbd_server``: a whole NBD client session sent to a live ``NbdServer``;
  afterwards a fresh libnbd client and one connected since the start must
  still read the disk and its block status exactly as before.
- ``control_server``: a stream of control frames sent to the tracker's
  ``ControlServer`` over a live ``BitmapStore``; every reply is ok or a
  structured error, only framing errors end the connection, and a failed
  request leaves every file of the state directory as it was.
- ``nbd_parsers`` and ``control_parsers``: the pure parsers
  (``dirtydiff.nbdproto``, ``dirtydiff.control``) walked over a session the
  way the servers frame it.

``tests/test_fuzz.py`` runs them all under Hypothesis in the default suite
(corpus replayed, then mutated, plus generated sessions), and also against
``dirtydiff serve`` (its NBD socket and STATE/sidecar.sock) and the real
tracker under nbdkit. A long run::

    DIRTYDIFF_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q --timeout=0 tests/test_fuzz.py

Coverage-guided, with atheris (libFuzzer), one target at a time::

    .venv/bin/python -m tests.fuzz.nbd_parsers -atheris_runs=100000 tests/fuzz/corpus/nbd
    .venv/bin/python -m tests.fuzz.control_parsers -atheris_runs=100000 tests/fuzz/corpus/control
    .venv/bin/python -m tests.fuzz.nbd_server -atheris_runs=5000 tests/fuzz/corpus/nbd
    .venv/bin/python -m tests.fuzz.control_server -atheris_runs=5000 tests/fuzz/corpus/control
    DIRTYDIFF_FUZZ_TLS=1 .venv/bin/python -m tests.fuzz.nbd_server -atheris_runs=5000 \
        tests/fuzz/corpus/nbd

The last is the NBD server with TLS required (``tests/test_fuzz_tls.py`` runs
it under Hypothesis): the option phase before STARTTLS, and STARTTLS followed
by what is no ClientHello.

libFuzzer adds the inputs that find new coverage to the first corpus
directory given; to keep the repo's corpus small, pass a scratch directory
first (``python -m tests.fuzz.nbd_server /tmp/new tests/fuzz/corpus/nbd``)
and copy in only what is worth keeping. With
``-artifact_prefix=tests/fuzz/corpus/nbd/`` an input that fails lands in the
corpus as ``crash-<sha1>``, a regression seed every later run replays.

The corpus (``corpus/nbd``: client-to-server byte streams; ``corpus/control``:
streams of control frames) holds recorded sessions of real clients, hand-made
hostile ones, and ``crash-*`` seeds of fixed defects. ``corpus/regressions``
holds seeds replayed only by their own regression test in tests/test_fuzz.py
(they need a setup of their own, or are too costly to mutate).
``python -m tests.fuzz.record`` rebuilds the recorded and hand-made seeds and
keeps the ``crash-*`` ones.
"""
