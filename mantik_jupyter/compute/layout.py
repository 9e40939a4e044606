"""The run directory: the file names every backend, the RunService and the job script share.

Every run has a directory of its own (``<directory>/<run_id>/`` for the local backend,
``<remote_dir>/<run_id>`` over SSH, the job's working directory with UNICORE). It is
filled in three steps:

1. The RunService prepares a staging directory (``PreparedJob.local_dir``) with
   ``package.tar.gz`` (``PACKAGE_FILE``, the packed project), ``mantik-job.sh``
   (``JOB_SCRIPT``, rendered by ``script.render_job_script``) and ``.mantik-credentials``
   (``CREDENTIALS_FILE``, mode 0600, the tracking credential as ``KEY=VALUE`` lines).
2. The backend copies those files into the run directory, unpacks the package into
   ``code/`` (``CODE_DIR``) and starts ``mantik-job.sh`` there (``sbatch`` on Slurm,
   ``bash`` locally and with UNICORE).
3. The job script reads and deletes the credential file, runs the entry point in
   ``code/``, sends its output to ``mantik.log`` (``LOG_FILE``) and, when it ends,
   writes its exit status to ``mantik.exitcode`` (``EXIT_CODE_FILE``), the fallback
   the backends read when the scheduler no longer knows the job.

Backends may add files of their own (the local backend's ``mantik.jobid``,
``mantik.jobmarker`` and ``mantik.cancelled``, UNICORE's ``mantik-login.log``); those stay
in the backend.
"""

from __future__ import annotations

PACKAGE_FILE = "package.tar.gz"
JOB_SCRIPT = "mantik-job.sh"
CREDENTIALS_FILE = ".mantik-credentials"
# Output of the config's commands on the login node (UNICORE, SSH and local backends).
LOGIN_LOG_FILE = "mantik-login.log"
CODE_DIR = "code"
LOG_FILE = "mantik.log"
EXIT_CODE_FILE = "mantik.exitcode"

# Block size for copying files and streams to and from a run directory.
CHUNK = 256 * 1024
# read_log answers at most this much per call, so a huge log streams in pieces.
MAX_LOG_READ = 4 * 1024 * 1024
