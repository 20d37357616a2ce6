"""Writer-side reads that both stores share: the same SQL on the writer's connection
(SQLite's, or the PostgreSQL transaction through :class:`~.postgres.PgConn`)."""

from __future__ import annotations

from typing import Any

from ..model import AccountState, AccountStatus, PlanState
from .queries import ACCOUNT_COLUMNS, account_of_row, read_account, read_plans


class StoreReads:
    """Needs ``self.conn`` with an sqlite3-style ``execute(sql, params)``."""

    conn: Any

    def overdue_accounts(self) -> list[tuple[str, int]]:
        return [tuple(r) for r in self.conn.execute(  # type: ignore[misc]
            "SELECT account_id, overdue_since_us FROM accounts"
            " WHERE overdue_since_us IS NOT NULL AND status != ?",
            (int(AccountStatus.SUSPENDED),))]

    def meta_get(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def load_account(self, account_id: str) -> AccountState | None:
        acct = read_account(self.conn, account_id)
        if acct is not None:
            acct.live_plans = self.load_plans(
                "WHERE account_id = ? AND refunded_at_us IS NULL AND units_remaining > 0",
                (account_id,))
        return acct

    def load_accounts(self, account_ids: list[str]) -> dict[str, AccountState]:
        """Many accounts with their live plans in two statements (PostgreSQL: a group's
        accounts that another node changed are reloaded at once, not one by one)."""
        found = {row[0]: account_of_row(row) for row in self.conn.execute(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ANY(?)",
            (account_ids,)).fetchall()}
        for acct in found.values():
            acct.live_plans = []
        for plan in self.load_plans("WHERE account_id = ANY(?) AND refunded_at_us IS NULL"
                                    " AND units_remaining > 0", (account_ids,)):
            found[plan.account_id].live_plans.append(plan)  # in R8 order, as loaded
        return found

    def load_plans(self, where: str, params: tuple = ()) -> list[PlanState]:
        return read_plans(self.conn, where, params)

    def live_plans_expiring_by(self, t_us: int) -> list[tuple[int, int, str, str]]:
        """(expires_at, purchase_seq, plan_id, account_id) of live plans due by t (R9)."""
        return [tuple(r) for r in self.conn.execute(  # type: ignore[misc]
            "SELECT expires_at_us, purchase_seq, plan_id, account_id FROM plans"
            " WHERE refunded_at_us IS NULL AND units_remaining > 0 AND expires_at_us <= ?",
            (t_us,))]

    def find_key(self, account_id: str, kind: str, request_id: str
                 ) -> tuple[int, str | None, str | bytes, int] | None:
        """R12: the entry that already claimed this key: (seq, fingerprint, payload, at_us)."""
        row = self.conn.execute(
            "SELECT seq, fingerprint, payload, at_us FROM journal"
            " WHERE account_id = ? AND kind = ? AND request_id = ?",
            (account_id, kind, request_id)).fetchone()
        return (row[0], row[1], row[2], row[3]) if row else None

    def feature_day(self, account_id: str, day: str) -> tuple[int, int, int, int] | None:
        row = self.conn.execute(
            "SELECT start_scenarios, start_custom, max_scenarios, custom_any FROM features_daily"
            " WHERE account_id = ? AND day = ?", (account_id, day)).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]
