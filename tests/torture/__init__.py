"""A seeded torture suite: real processes, faults at random moments, no write lost.

Each scenario (scenario.py) runs the tracker, the sidecar, backup servers and
writer clients, injects faults while the writers go on, and ends with the
check (verify.py): every bitmap dirtydiff reports consistent, laid over the
backup it refers to, reproduces the disk byte for byte, and every bitmap that
cannot be proven complete is reported inconsistent and not exported.

The long run (see runner.py)::

    .venv/bin/python -m tests.torture --scenarios 200 --seed 1

and one scenario again, from the seed a failure printed::

    .venv/bin/python -m tests.torture --replay SEED
"""
