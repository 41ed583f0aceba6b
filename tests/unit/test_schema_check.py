"""`testpulse migrate --check`: each standing of the schema gets its exit code and remedy, and the
command line refuses what it cannot mean."""

from __future__ import annotations

import pytest

from testpulse.cli import main, parser
from testpulse.store.schema import SchemaState, Standing
from testpulse.store.schema_check import Verdict, judge

pytestmark = pytest.mark.unit


def test_each_standing_gets_its_exit_code_and_says_what_to_do() -> None:
    current = judge(SchemaState("0003", "0003", Standing.CURRENT))
    assert (current.verdict, current.verdict.value) == (Verdict.CURRENT, 0)
    assert current.message == "database schema at revision 0003, this build's newest"
    empty = judge(SchemaState(None, "0003", Standing.EMPTY))
    assert empty.verdict.value == 1 and "no schema yet" in empty.message and "testpulse migrate" in empty.message
    older = judge(SchemaState("0001", "0003", Standing.OLDER))
    assert older.verdict.value == 1 and "0001, older than this build's 0003" in older.message
    newer = judge(SchemaState("9999", "0003", Standing.NEWER))
    assert newer.verdict.value == 3 and "upgrade testpulse" in newer.message
    assert Verdict.UNAVAILABLE.value == 4
    assert 2 not in {v.value for v in Verdict}, "2 is argparse's usage error"


def test_check_takes_a_bounded_wait_and_excludes_sql() -> None:
    args = parser().parse_args(["migrate", "--check", "--wait", "300"])
    assert (args.check, args.wait, args.sql) == (True, 300.0, False)
    assert parser().parse_args(["migrate", "--check"]).wait == 0.0
    for argv in (["migrate", "--check", "--sql"], ["migrate", "--check", "--wait", "-1"]):
        with pytest.raises(SystemExit) as exited:
            parser().parse_args(argv)
        assert exited.value.code == 2, argv
    with pytest.raises(SystemExit) as exited:
        main(["migrate", "--wait", "5"])
    assert exited.value.code == 2
