"""sbatch's refusals in words: the reason it gave, quoted, and the fix that fits it (a controller it cannot reach,
a cap on queued jobs, an unknown QOS or account, or what a job asks for that no node has)."""

from __future__ import annotations

from hpc.executors import SubmissionError

# sbatch's words when it never reached the controller (no configuration, controller down), not a refusal
UNREACHABLE = ("Could not establish a configuration source", "Unable to process configuration file",
               "Unable to contact slurm controller", "Socket timed out", "Connection refused")
# sbatch's words for a refusal, and what to do about it; the first that appears in the reason applies
FIXES = (
    (("MaxSubmitJob", "job submit limit"),
     "the cluster caps how many jobs you may have queued, and each array task counts as one: submit fewer tasks "
     "(give each more work) or wait until your queued jobs have ended (squeue --me); `sacctmgr show qos "
     "format=name,maxsubmitjobsperuser` and `sacctmgr show assoc user=$USER format=account,maxsubmitjobs` show the "
     "caps"),
    (("Invalid qos",),
     "set cluster.qos to a QOS you may use, or leave it null for your default (`sacctmgr show assoc user=$USER "
     "format=account,qos` lists yours)"),
    (("Invalid account",),
     "set cluster.account to an account you belong to, or leave it null for your default (`sacctmgr show assoc "
     "user=$USER format=account,partition` lists yours)"),
)
GENERIC_FIX = ("ask for what the cluster has (cluster.mem_gb, cluster.cpus_per_task, cluster.gpus_per_node, "
               "cluster.partition, ...: in your profile configs/cluster/<name>.yaml or as overrides; `sinfo -N -l` "
               "lists the nodes)")


def refusal(reason: str) -> SubmissionError:
    """The error for a submission sbatch refused (or could not make) with ``reason``, naming the fix."""
    if any(sign in reason for sign in UNREACHABLE):
        return SubmissionError(
            f"sbatch cannot reach the SLURM controller: {reason}\n  fix: check that SLURM is configured here "
            "(SLURM_CONF, or /etc/slurm/slurm.conf) and that its controller answers (`scontrol ping`); on one "
            "machine, start this project's cluster: bash hpc/local_cluster/start.sh")
    fix = next((fix for signs, fix in FIXES if any(sign.lower() in reason.lower() for sign in signs)), GENERIC_FIX)
    return SubmissionError(f"the SLURM scheduler refused the job: {reason}\n  fix: {fix}")
