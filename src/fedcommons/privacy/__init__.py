"""Differential privacy: client DP-SGD, central DP-FedAvg, the privacy ledger and audits.

- :mod:`~fedcommons.privacy.config` — budgets and mechanism parameters, validated.
- :mod:`~fedcommons.privacy.accounting` — Opacus (runtime) and dp-accounting (audit).
- :mod:`~fedcommons.privacy.client_dp` — an institution's Opacus DP-SGD, persistent spend.
- :mod:`~fedcommons.privacy.client_spend` — the spend record every DP reply carries.
- :mod:`~fedcommons.privacy.central` — DP-FedAvg (McMahan et al. 2018), Flower-free.
- :mod:`~fedcommons.privacy.distributed` — distributed DP under SecAgg+ (Skellam noise
  added by the institutions; Agarwal, Kairouz & Liu 2021).
- :mod:`~fedcommons.privacy.ledger` — the append-only, hash-chained privacy ledger.
- :mod:`~fedcommons.privacy.line` — a release line's budget, ledger and manifest field.
- :mod:`~fedcommons.privacy.audits` — ledger recomputation (``ledger_audit``) and the
  one-run canary audit (``canary``) (Steinke, Nasr & Jagielski 2023).

Submodules are imported on demand (the client SDK needs only the client side).
"""
