"""ListAccounts: id order, prefix, paging, limits, and account-limited reader tokens."""

from __future__ import annotations

import grpc
import pytest
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import accounts_pb2_grpc as apb_grpc

from clients.client import LedgerClient
from server.auth import create_token

from .conftest import T0, ServerProcess

IDS = ["acme", "acme-eu", "acme-us", "beta", "zeta"]


@pytest.fixture(scope="module")
def listed(tmp_path_factory, module_db):
    tmp = tmp_path_factory.mktemp("list")
    tokens_file = str(tmp / "tokens.toml")
    admin = create_token(tokens_file, "admin-1", "admin", [])
    limited = create_token(tokens_file, "reader-acme", "reader", ["acme-us", "beta", "nobody"])
    srv = ServerProcess(tmp, extra=["--tokens", tokens_file], db=module_db).start()
    with LedgerClient(srv.target, token=admin) as c:
        c.set_time(T0)
        for account_id in reversed(IDS):
            c.create_account(account_id)
    channel = grpc.insecure_channel(srv.target)
    yield apb_grpc.AccountsStub(channel), admin, limited
    channel.close()
    srv.stop()


def _list(stub, token, **kw):
    return stub.ListAccounts(apb.ListAccountsRequest(**kw),
                             metadata=[("authorization", f"Bearer {token}")])


def test_lists_every_account_in_id_order_across_pages(listed):
    stub, admin, _ = listed
    seen, token = [], ""
    for _ in range(10):  # bounded: 5 accounts, pages of 2
        page = _list(stub, admin, page_size=2, page_token=token)
        assert len(page.accounts) <= 2
        seen += [a.account_id for a in page.accounts]
        token = page.next_page_token
        if not token:
            break
    assert seen == IDS


def test_prefix_selects_a_range(listed):
    stub, admin, _ = listed
    page = _list(stub, admin, prefix="acme-")
    assert [a.account_id for a in page.accounts] == ["acme-eu", "acme-us"]
    assert page.next_page_token == ""
    assert _list(stub, admin, prefix="acme-", page_token="acme-eu").accounts[0].account_id \
        == "acme-us"


def test_limited_reader_sees_only_its_accounts(listed):
    stub, _, limited = listed
    page = _list(stub, limited)
    assert [a.account_id for a in page.accounts] == ["acme-us", "beta"]


@pytest.mark.parametrize("kw", [{"page_size": 1001}, {"page_size": -1},
                                {"prefix": "a\x00b"}, {"page_token": "x" * 65}])
def test_bad_paging_is_invalid_argument(listed, kw):
    stub, admin, _ = listed
    with pytest.raises(grpc.RpcError) as err:
        _list(stub, admin, **kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
