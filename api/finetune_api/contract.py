"""The pod contract: what the operator puts into a trainer pod and the trainer reads back.

Both sides import these names, so that a path, an environment variable or an annotation
cannot drift apart (the operator once mounted the report token where the trainer did not
look for it by default).  A test renders a pod and checks the trainer's defaults against it.
"""

from __future__ import annotations

# --- the container -----------------------------------------------------------------------------

CONTAINER_NAME = "trainer"
JOB_FILE_DIR = "/etc/finetune"
JOB_FILE = f"{JOB_FILE_DIR}/job.yaml"
TERMINATION_LOG = "/dev/termination-log"
DATA_ROOT = "/data"  # pvc://CLAIM/path is mounted at DATA_ROOT/CLAIM/path
CACHE_DIR = "/cache"


def trainer_command() -> list[str]:
    """The container command; the trainer image's entrypoint is the same (a test compares them).

    No ``accelerate launch`` in front: it turns the trainer's exit codes into 1, and the
    podFailurePolicy keys on them (2 bad input, 3 out of memory).  With several GPUs the
    trainer starts one worker per GPU itself and exits with the code they recorded.
    """
    return ["python", "-m", "finetune_trainer", "run", JOB_FILE]


# --- the report channel --------------------------------------------------------------------------

# The audience of the projected service-account token the trainer reports with; the operator
# accepts a token only when the TokenReview says it was issued for this audience.
REPORT_AUDIENCE = "finetune-operator"
TOKEN_DIR = "/var/run/finetune/report"
TOKEN_FILE = f"{TOKEN_DIR}/token"
CA_FILE = f"{TOKEN_DIR}/ca.crt"
TOKEN_SECONDS = 86400  # the kubelet renews it at 80%; the trainer reads the file at every report


def report_path(namespace: str, name: str) -> str:
    """The operator's endpoint for one FineTuneJob's progress (relative to its base URL)."""
    return f"/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/progress"


# --- credentials ----------------------------------------------------------------------------------

# The Secret named by spec.baseModel.credentialsSecret is mounted here, one file per key
# (HF_TOKEN, AWS_ACCESS_KEY_ID, ...): files, not environment variables, which every child
# process inherits and many tools print.  The trainer reads them where it needs them.
CREDENTIALS_DIR = "/var/run/finetune/credentials"

# --- environment variables the operator sets and the trainer reads ------------------------------

ENV_JOB = "FINETUNE_JOB"  # namespace/name
ENV_ATTEMPT = "FINETUNE_ATTEMPT"  # the pod's name
ENV_REPORT_URL = "FINETUNE_REPORT_URL"
ENV_REPORT_TOKEN = "FINETUNE_REPORT_TOKEN"  # a literal token (workstations, tests)
ENV_REPORT_TOKEN_FILE = "FINETUNE_REPORT_TOKEN_FILE"
ENV_REPORT_CA_FILE = "FINETUNE_REPORT_CA_FILE"
ENV_TERMINATION_LOG = "FINETUNE_TERMINATION_LOG"
ENV_CACHE_DIR = "FINETUNE_CACHE_DIR"
ENV_CREDENTIALS_DIR = "FINETUNE_CREDENTIALS_DIR"  # where the credentials Secret is mounted
ENV_CREDENTIALS_SECRET = "FINETUNE_CREDENTIALS_SECRET"  # its name, for the trainer's messages

# --- labels and annotations ----------------------------------------------------------------------

MANAGED_BY = "finetune-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB_NAME = "finetune.dev/job-name"
ANNOTATION_FULL_NAME = "finetune.dev/finetunejob"
ANNOTATION_JOB_FILE = "finetune.dev/job-yaml"
ANNOTATION_REPORT_CA = "finetune.dev/report-ca"
ANNOTATION_OPERATOR_VERSION = "finetune.dev/operator-version"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# --- a hand on a running job ------------------------------------------------------------------------
#
# A person with patch rights on the FineTuneJob sets one of these (``kubectl ftj save NAME``, or
# ``kubectl annotate``); the operator passes it to the trainer in the reply to its next progress
# report; the trainer acts at the next step boundary and says so in its reports (``done``); the
# operator then removes the annotation and records an Event.  The value tells one request from
# the next (``kubectl ftj`` writes the time): each value is acted on once.
REQUEST_ANNOTATIONS = {
    "save": "finetune.dev/save-now",  # a checkpoint now
    "sample": "finetune.dev/sample-now",  # the samples now
    "stop": "finetune.dev/stop-now",  # stop, export what there is: Succeeded, reason StoppedEarly
}
MAX_REQUEST_VALUE = 128
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
