"""Budgets and limits per person and group (DESIGN §9): configured in ``limits``, counted in
``ledger`` from the log (``spend_log``), enforced by ``governor`` in the request hook."""
