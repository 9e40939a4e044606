"""How Slurm's answers become RunStates, and path cleaning (no cluster needed)."""

from __future__ import annotations

import pytest

from mantik_jupyter.compute.backends import ssh_slurm, unicore
from mantik_jupyter.compute.backends.base import describe_error
from mantik_jupyter.compute.backends.paths import clean_relative
from mantik_jupyter.compute.backends.slurm_words import decide, parse_table, sbatch_culprit
from mantik_jupyter.compute.config import parse_config
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import UnsafePath


@pytest.mark.parametrize(
    ("squeue", "sacct", "exitcode", "state", "reason"),
    [
        (["PENDING"], None, None, RunState.QUEUED, None),
        (["CONFIGURING"], ["PENDING", "0:0"], None, RunState.QUEUED, None),
        (["REQUEUED"], None, None, RunState.QUEUED, None),
        (["RUNNING"], ["RUNNING", "0:0"], None, RunState.RUNNING, None),
        (["COMPLETING"], None, None, RunState.RUNNING, None),
        # Requeued and held, to be released: sacct's record of the first attempt is old.
        (["SPECIAL_EXIT"], ["REQUEUED", "0:0"], ["0"], RunState.QUEUED, None),
        (None, ["COMPLETED", "0:0"], ["0"], RunState.FINISHED, None),
        # The job script's own record wins: the command failed, the script exited 0.
        (None, ["COMPLETED", "0:0"], ["2"], RunState.FAILED, "exit code 2"),
        (["FAILED"], ["FAILED", "3:0"], None, RunState.FAILED, "exit code 3"),
        # Ended by its owner (sacct's UID column is the owner's): nothing more to say.
        (
            None,
            ["CANCELLED by 1001", "0:15", "", "", "", "", "1001"],
            None,
            RunState.KILLED,
            "CANCELLED",
        ),
        # sacct lags behind slurmctld: squeue's final word beats sacct's RUNNING.
        (["COMPLETED"], ["RUNNING", "0:0"], ["0"], RunState.FINISHED, None),
        # No accounting, squeue forgot the job: the exit-code file decides.
        (None, None, ["0"], RunState.FINISHED, None),
        (None, None, ["1"], RunState.FAILED, "exit code 1"),
        (None, None, None, RunState.UNKNOWN, None),
    ],
)
def test_slurm_words_map_to_run_states(squeue, sacct, exitcode, state, reason):
    status = decide(squeue, sacct, exitcode)
    assert status.state == state
    assert status.reason == reason


@pytest.mark.parametrize("path", ["..", "a/../../b", "/etc", "~root", "a/..\\..\\b"])
def test_escaping_paths_are_refused(path):
    with pytest.raises(UnsafePath):
        clean_relative(path)


@pytest.mark.parametrize(
    ("path", "clean"), [("", ""), (".", ""), ("a//b/./c", "a/b/c"), ("out/", "out")]
)
def test_harmless_paths_are_normalised(path, clean):
    assert clean_relative(path) == clean


@pytest.mark.parametrize(
    ("reason", "blocked"),
    [
        ("PartitionNodeLimit", True),
        ("PartitionConfig", True),
        ("PartitionTimeLimit", True),
        ("Priority", False),
        ("", False),
    ],
)
def test_pending_for_good_says_why(reason, blocked):
    status = decide(["PENDING", reason], None, None)
    assert status.state == RunState.QUEUED
    assert (status.reason is not None and reason in status.reason) == blocked


# squeue's reason words (Slurm 22.05's job_reason_string) for a job over a per-job limit of
# its QoS or association, or under an account or QoS it may not use: it never starts as
# submitted. They were QUEUED without a word, like a job waiting for its turn.
@pytest.mark.parametrize(
    ("reason", "key"),
    [
        ("QOSMaxWallDurationPerJobLimit", "Resources.Runtime"),
        ("AssocMaxWallDurationPerJobLimit", "Resources.Runtime"),
        ("QOSMaxNodePerJobLimit", "Resources.Nodes"),
        ("AssocMaxNodePerJobLimit", "Resources.Nodes"),
        ("QOSMaxCpuPerJobLimit", "TotalCPUs"),
        ("AssocMaxCpuPerJobLimit", "TotalCPUs"),
        ("QOSMaxCpuPerNode", "CPUsPerNode"),
        ("AssocMaxCpuPerNode", "CPUsPerNode"),
        ("QOSMaxCpuMinutesPerJobLimit", "Resources.Runtime"),
        ("AssocMaxCpuMinutesPerJobLimit", "Resources.Runtime"),
        ("QOSMaxMemoryPerJob", "Resources.MemoryPerNode"),
        ("AssocMaxMemPerJob", "Resources.MemoryPerNode"),
        ("QOSMaxMemoryPerNode", "Resources.MemoryPerNode"),
        ("AssocMaxMemPerNode", "Resources.MemoryPerNode"),
        ("QOSMaxGRESPerJob", "Resources.GPUsPerNode"),
        ("AssocMaxGRESPerJob", "Resources.GPUsPerNode"),
        ("QOSMaxGRESPerNode", "Resources.GPUsPerNode"),
        ("AssocMaxGRESPerNode", "Resources.GPUsPerNode"),
        ("QOSMinCpuNotSatisfied", "TotalCPUs"),
        ("InvalidAccount", "ComputeBudgetAccount"),
        ("AccountNotAllowed", "ComputeBudgetAccount"),
        ("InvalidQOS", "Resources.QoS"),
        ("QOSNotAllowed", "Resources.QoS"),
    ],
)
def test_pending_for_good_under_a_qos_or_account_says_which_key(reason, key):
    status = decide(["PENDING", reason], ["PENDING", "0:0"], None)
    assert (status.state, status.native_state) == (RunState.QUEUED, "PENDING")
    assert status.reason is not None
    assert status.reason.startswith(f"waiting for good (Slurm: {reason}): ")
    assert key in status.reason
    assert "`s" in status.reason  # the command that lists what the cluster allows


# Limits that clear when other jobs end (Grp*: the QoS's or account's running total;
# *PerUser: the user's other jobs), and the Grp*Minutes budgets: waiting is right, and no
# key of the request is at fault.
@pytest.mark.parametrize(
    "reason",
    [
        "QOSMaxJobsPerUserLimit",
        "QOSMaxCpuPerUserLimit",
        "QOSMaxNodePerUserLimit",
        "AssocGrpCpuLimit",
        "AssocGrpNodeLimit",
        "AssocGrpJobsLimit",
        "QOSGrpCpuLimit",
        "AssocGrpCPUMinutesLimit",
        "AssocMaxJobsLimit",
        "Resources",
    ],
)
def test_pending_for_a_limit_that_clears_says_nothing(reason):
    assert decide(["PENDING", reason], None, None).reason is None


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        (TimeoutError(), "TimeoutError"),
        (OSError("Connection refused"), "OSError: Connection refused"),
        (EOFError("  \n"), "EOFError"),
    ],
)
def test_backends_describe_an_error_alike(exc, said):
    # One wording for the SSH and the UNICORE backend's connection errors.
    assert ssh_slurm.describe_error is unicore.describe_error is describe_error
    assert describe_error(exc) == said


@pytest.mark.parametrize("sacct", [None, ["PENDING", "0:0"]])
def test_job_held_because_its_reservation_went_is_queued_and_says_why(sacct):
    # Without accounting (sacct None) the state word alone decides; it was UNKNOWN.
    status = decide(["RESV_DEL_HOLD", "Reservation maint-1 was deleted"], sacct, None)
    assert (status.state, status.native_state) == (RunState.QUEUED, "RESV_DEL_HOLD")
    assert "Reservation maint-1 was deleted" in status.reason
    assert "Resources.Reservation" in status.reason


SOURCE = "/home/u/project/compute-backend-config.yaml"


def _config(account: str | None = None, **resources) -> object:
    data: dict = {"SSH": {"Hostname": "login.example.org"}, "Resources": {"Queue": "batch"}}
    data["Resources"].update(resources)
    if account is not None:
        data["ComputeBudgetAccount"] = account
    return parse_config(data, source=SOURCE)


# sbatch's words as Slurm 22.05 prints them (slurm_errno strings and job reasons).
_REFUSED = "sbatch: error: Batch job submission failed: "
_POLICY = (
    _REFUSED
    + "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)"
)


@pytest.mark.parametrize(
    ("said", "resources", "named"),
    [
        (
            _REFUSED + "Invalid qos specification",
            {"QoS": "no-such-qos"},
            "Resources.QoS 'no-such-qos'",
        ),
        (
            _REFUSED + "Requested time limit is invalid (missing or exceeds some limit)",
            {"Runtime": "2d"},
            "Resources.Runtime (2-00:00:00)",
        ),
        (_REFUSED + "Node count specification invalid", {"Nodes": 64}, "Resources.Nodes 64"),
        (
            "sbatch: error: QOSMaxWallDurationPerJobLimit\n" + _POLICY,
            {"Runtime": "90m", "QoS": "short"},
            "Resources.Runtime (0-01:30:00)",
        ),
        (
            "sbatch: error: AssocMaxNodePerJobLimit\n" + _POLICY,
            {"Nodes": 8},
            "Resources.Nodes 8",
        ),
        # A QoS the account may not use, left to the site's default: nothing to show.
        (_REFUSED + "Invalid qos specification", {}, "Resources.QoS (not set)"),
    ],
)
def test_sbatch_refusals_name_the_key_value_and_file(said, resources, named):
    where, hint = sbatch_culprit(said, _config(**resources))
    assert where == f"{named} in {SOURCE}"
    assert "`s" in hint  # the command that lists what the cluster allows


def test_an_account_refusal_names_where_the_account_came_from(monkeypatch):
    said = _REFUSED + "Invalid account or account/partition combination specified"
    monkeypatch.delenv("MANTIK_COMPUTE_BUDGET_ACCOUNT", raising=False)
    where, hint = sbatch_culprit(said, _config(account="nobudget"))
    assert where == f"ComputeBudgetAccount 'nobudget' in {SOURCE}"
    assert "sacctmgr" in hint
    where, _ = sbatch_culprit(said, _config())
    assert where == (
        f"ComputeBudgetAccount (not set: {SOURCE} has none, nor does MANTIK_COMPUTE_BUDGET_ACCOUNT)"
    )
    # Mantik's way: the account from the environment, when the file sets none.
    monkeypatch.setenv("MANTIK_COMPUTE_BUDGET_ACCOUNT", "envbudget")
    where, _ = sbatch_culprit(said, _config())
    assert "ComputeBudgetAccount 'envbudget'" in where
    assert "MANTIK_COMPUTE_BUDGET_ACCOUNT" in where and SOURCE in where


def test_a_refusal_that_names_no_key_is_left_as_it_is():
    said = _REFUSED + "Requested node configuration is not available"
    assert sbatch_culprit(said, _config(Nodes=2)) is None
    assert sbatch_culprit(_REFUSED + "Invalid qos specification", None) is None


@pytest.mark.parametrize(
    ("squeue", "sacct", "started"),
    [
        # What the loopback cluster's squeue and sacct said (SLURM_TIME_FORMAT=%s).
        (["RUNNING", "None", "1795786787", "localhost"], None, 1795786787000),
        (["COMPLETED", "None", "1795786787", "localhost"], None, 1795786787000),
        (None, ["COMPLETED", "0:0", "1795786787", "localhost"], 1795786787000),
        # A pending job's StartTime is when Slurm expects to start it.
        (["PENDING", "Priority", "1795790000", ""], None, None),
        (["PENDING", "JobHeldUser", "N/A", ""], None, None),
        # Cancelled in the queue: StartTime is the cancel, and no node ever ran it.
        (["CANCELLED", "JobHeldUser", "1795786783", ""], None, None),
        (None, ["CANCELLED by 0", "0:0", "1795786783", "None assigned"], None),
        # Rows without the columns (an older caller): no start time.
        (["RUNNING"], ["RUNNING", "0:0"], None),
    ],
)
def test_a_job_that_ran_gets_slurms_start_time(squeue, sacct, started):
    assert decide(squeue, sacct, None).started_at == started


# Jobs Slurm ended itself, as the loopback cluster's squeue (State|Reason|StartTime|NodeList|
# TimeLimit) and sacct (State|ExitCode|Start|NodeList|Timelimit|ReqMem|UID) said them, and
# as Slurm 22.05 words the cases it cannot produce (no memory cgroup, one shared node).
# The run read "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED" or "FAILED": Slurm's
# word, not what happened nor what to do.
_T = "1795795754"
_USERS = {"0": ["root"], "me": ["1001"]}


@pytest.mark.parametrize(
    ("squeue", "sacct", "exitcode", "state", "said"),
    [
        (
            ["TIMEOUT", "TimeLimit", _T, "localhost", "1:00"],
            ["TIMEOUT", "0:15", _T, "localhost", "00:01:00", "8000M", "1001"],
            None,
            RunState.FAILED,
            ["Slurm ended the job: time limit of 00:01:00 reached", "Resources.Runtime"],
        ),
        # No accounting: squeue's time limit.
        (
            ["TIMEOUT", "TimeLimit", _T, "localhost", "1:00"],
            None,
            None,
            RunState.FAILED,
            ["time limit of 1:00 reached", "Resources.Runtime"],
        ),
        (
            None,
            ["OUT_OF_MEMORY", "0:125", _T, "n1", "01:00:00", "20M", "1001"],
            None,
            RunState.FAILED,
            ["out of memory", "more than the 20M it asked for", "Resources.MemoryPerNode"],
        ),
        (
            ["NODE_FAIL", "NodeDown", _T, "n1", "1:00:00"],
            ["NODE_FAIL", "0:0", _T, "n1", "01:00:00", "8000M", "1001"],
            None,
            RunState.FAILED,
            ["Slurm ended the job: node n1 failed", "Submit the run again"],
        ),
        (
            ["FAILED", "JobLaunchFailure", _T, "localhost", "UNLIMITED"],
            ["FAILED", "0:53", _T, "localhost", "UNLIMITED", "8000M", "1001"],
            None,
            RunState.FAILED,
            ["Slurm could not launch the job on node localhost", "never ran"],
        ),
        # slurmd refused a revoked credential: Slurm's exit code 1, and no script ran to
        # write the exit-code file. It read "exit code 1".
        (
            ["FAILED", "JobLaunchFailure", _T, "localhost", "UNLIMITED"],
            ["FAILED", "1:0", _T, "localhost", "UNLIMITED", "8000M", "1001"],
            None,
            RunState.FAILED,
            ["Slurm could not launch the job on node localhost"],
        ),
        (
            None,
            ["FAILED", "0:53", _T, "localhost", "UNLIMITED", "8000M", "1001"],
            None,
            RunState.FAILED,
            ["Slurm marked the job FAILED (ExitCode 0:53) without saying why"],
        ),
        (
            ["CANCELLED", "None", _T, "localhost", "UNLIMITED"],
            ["CANCELLED by 0", "0:0", _T, "localhost", "UNLIMITED", "8000M", "1001"],
            None,
            RunState.KILLED,
            ["Slurm ended the job: cancelled by user root (not you)"],
        ),
        # A uid the login node cannot name.
        (
            None,
            ["CANCELLED by 4242", "0:15", _T, "localhost", "UNLIMITED", "8000M", "1001"],
            None,
            RunState.KILLED,
            ["cancelled by uid 4242 (not you)"],
        ),
        (
            None,
            ["PREEMPTED", "0:15", _T, "localhost", "UNLIMITED", "8000M", "1001"],
            None,
            RunState.FAILED,
            ["preempted", "Resources.QoS"],
        ),
    ],
)
def test_a_job_slurm_ended_says_what_happened_and_what_to_do(
    squeue, sacct, exitcode, state, said
):
    status = decide(squeue, sacct, exitcode, _USERS)
    assert status.state == state
    for words in said:
        assert words in status.reason, status.reason


def test_a_failing_program_is_its_exit_code_whatever_squeue_adds():
    # The script ran to its end and recorded the failure: Slurm did not stop it.
    squeue = ["FAILED", "NonZeroExitCode", _T, "localhost", "UNLIMITED"]
    sacct = ["FAILED", "3:0", _T, "localhost", "UNLIMITED", "8000M", "1001"]
    assert decide(squeue, sacct, ["3"], _USERS).reason == "exit code 3"
    assert decide(squeue, sacct, None, _USERS).reason == "exit code 3"


def test_requeued_and_several_jobs_read_each_ones_latest_record():
    # sacct -D lists every attempt of a requeued job; the latest is the job's end.
    rows = parse_table(
        "101|REQUEUED|0:0|1795795700|localhost|Partition_Limit|8000M|1001\n"
        "101|CANCELLED by 0|0:0|1795795763|localhost|UNLIMITED|8000M|1001\n"
        "102|TIMEOUT|0:15|1795795754|localhost|00:01:00|8000M|1001\n"
        "103|CANCELLED by 1001|0:15|1795795754|localhost|UNLIMITED|8000M|1001\n",
        8,
    )
    answer = {j: decide(None, rows[j], None, _USERS) for j in ("101", "102", "103")}
    assert "cancelled by user root (not you)" in answer["101"].reason
    assert answer["101"].started_at == 1795795763000
    assert "time limit of 00:01:00" in answer["102"].reason
    assert answer["103"].reason == "CANCELLED"


def test_sacct_right_after_the_end_is_not_believed_beyond_its_state():
    # What sacct said for a moment after a job ended (UID 0, ReqMem "16?", no
    # Timelimit): the user's own cancel read "cancelled by user mantiktest (not you)",
    # root's read "CANCELLED".
    def row(state):
        return [state, "0:0", _T, "localhost", "", "16?", "0"]

    users = {**_USERS, "1001": ["mantiktest"]}
    assert decide(None, row("CANCELLED by 1001"), None, users).reason == "CANCELLED"
    root = decide(None, row("CANCELLED by 0"), None, users).reason
    assert "cancelled by user root (not you)" in root
    squeue = ["TIMEOUT", "TimeLimit", _T, "localhost", "2:00"]
    assert "time limit of 2:00 reached" in decide(squeue, row("TIMEOUT"), None, users).reason
    memory = decide(None, row("OUT_OF_MEMORY"), None, users).reason
    assert "16?" not in memory and "more than what it asked for" in memory


@pytest.mark.parametrize(
    ("exit_code", "shown"),
    [
        # slurmd refused a revoked job credential (FAILED 1:0): it read "exit code 1".
        ("1:0", "(ExitCode 1:0)"),
        # slurmstepd could not open the job's output (FAILED 0:53): it read "FAILED".
        ("0:53", "(ExitCode 0:53)"),
    ],
)
def test_a_failed_job_whose_script_recorded_nothing_is_not_its_exit_code(exit_code, shown):
    # squeue forgot the job (MinJobAge; the lab was closed), so its JobLaunchFailure is
    # gone; the run directory is known and holds no exit-code file.
    sacct = ["FAILED", exit_code, _T, "localhost", "UNLIMITED", "8000M", "1001"]
    status = decide(None, sacct, None, _USERS, file_expected=True)
    assert status.state == RunState.FAILED
    assert f"Slurm ended the job as FAILED {shown} before its script recorded" in status.reason
    assert "mantik.log" in status.reason
    # The script's own record is the program's exit code.
    assert decide(None, sacct, ["1"], _USERS, file_expected=True).reason == "exit code 1"
    # Where the run directory is unknown, nothing was looked for: Slurm's code stays.
    assert decide(None, ["FAILED", "1:0"], None, _USERS).reason == "exit code 1"
