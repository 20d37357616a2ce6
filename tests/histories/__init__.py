"""Histories checked from the outside, as Jepsen does (issue 23).

- :mod:`.worker`: one client process; its callers drive both nodes and record every
  operation as JSON lines (invoke, then ok / fail / unknown).
- :mod:`.nemesis`: the seeded schedule of faults (SIGKILL, SIGSTOP/SIGCONT, PostgreSQL
  restarted ``-m immediate``, a client process killed mid-call).
- :mod:`.model`: the rules as a sequential model of one account.
- :mod:`.checker`: reads only the histories and the final state the API reports, and
  searches, per account, for an order of the operations that real time allows and the
  model accepts.
- :mod:`.run` (``python -m tests.histories``, ``make histories``): runs and reports.

docs/histories.md explains what the checker proves and what it does not.
"""
