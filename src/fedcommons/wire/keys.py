"""Names of the records and keys inside Flower messages (one place, both sides)."""

# Coordinator -> client (train message)
BASE_ARRAYS = "arrays"  # ArrayRecord: the base weights θ0 of the round
TRAIN_CONFIG = "config"  # ConfigRecord: the round's instructions (keys below)

ROUND = "round"
SERVER_ROUND = "server-round"  # the same, under Flower strategies' name (quickstart apps)
RUN_TAG = "run-tag"
TASK = "task"
TASK_OPTION_PREFIX = "task."  # task options travel as "task.<option>"
LOCAL_EPOCHS = "local-epochs"
LEARNING_RATE = "lr"
BATCH_SIZE = "batch-size"
SEED = "seed"
FISHER_REQUEST = "fisher"  # bool: the strategy needs each client's diagonal Fisher
FISHER_SAMPLES = "fisher-samples"  # int: examples the Fisher is estimated on (default 256)
COMPRESSION = "compression"  # compression spec of the round's updates (#3), e.g. "topk:0.01+int8"
ERROR_FEEDBACK = "error-feedback"  # bool: carry what compression dropped into the next round
COMPRESSION_SEED = "compression-seed"  # int: the round's shared seed (random-k indices)
FISH_MASK = "fish-mask"  # "site" | "public": which examples a FISH mask is computed on

# Client -> coordinator (reply)
DELTA_ARRAYS = "delta"  # ArrayRecord: θ_local − θ0 (fedcommons clients)
FULL_ARRAYS = "arrays"  # ArrayRecord: θ_local (plain Flower clients, treated as dense)
REPLY_METRICS = "metrics"  # MetricRecord
MASK_ARRAYS = "mask"  # ArrayRecord (optional): bool mask per tensor; absent = dense
FISHER_CODES = "fisher-codes"  # ArrayRecord: int8 log-domain Fisher codes (wire/fisher.py)
FISHER_RANGES = "fisher-range"  # ArrayRecord: float32 [log_lo, log_hi] per tensor
ENCODED_RECORD = "encoded"  # ConfigRecord holding the encoded update (wire/codec.py)
ENCODED_PAYLOAD = "payload"  # bytes: the encoded update inside ENCODED_RECORD

NUM_EXAMPLES = "num-examples"  # Flower's conventional weighting key
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TRAIN_SECONDS = "train-seconds"

# Differential privacy (#6)
DP_CLAIM = "dp-sgd"  # reply metric: 1 when the update was trained with record-level DP-SGD
DP_SPEND = "dp-spend"  # ConfigRecord: the institution's cumulative DP spend (privacy.client_spend)
#: Error code of a reply refused because the round would exceed the institution's budget.
DP_BUDGET_EXHAUSTED_CODE = 6001

# Secure aggregation (#7)
SECAGG_RECORD = "secagg"  # ConfigRecord: one SecAgg+ stage's request or reply (privacy.secagg)
SECAGG_STAGE = (
    "stage"  # str inside SECAGG_RECORD: advertise-keys | share-keys | masked-input | unmask
)
SECAGG_INDEX = "index"  # int inside SECAGG_RECORD: the node's participant number (1..n)
SECAGG_DP_CLIP = "dp-clip-norm"  # float inside SECAGG_RECORD: clients L2-clip (central DP), 0: off
#: float inside SECAGG_RECORD: variance of the Skellam noise each client adds (distributed DP)
SECAGG_DP_NOISE = "dp-local-variance"
#: node config (#14): refuse secure rounds whose distributed noise at the threshold is lower
SECAGG_DP_MIN_NOISE = "dp-min-noise-multiplier"
SECAGG_REQUIRED = "secagg-required"  # node config: the institution refuses plaintext rounds
SECAGG_MIN_THRESHOLD = "secagg-min-threshold"  # node config: refuse rounds with a lower threshold
# node config (#13): the consortium roster of Ed25519 keys; with it, only signed advertisements
SECAGG_ROSTER = "secagg-roster"
SECAGG_SIGNING_KEY = "secagg-signing-key"  # node config: this institution's Ed25519 key (PEM)
SECAGG_ROSTER_SIGNER = "secagg-roster-signer"  # node config: pinned consortium key (64 hex)
#: Error code of a plaintext train message refused by an institution that requires secagg.
SECAGG_REQUIRED_CODE = 6002
#: Error code of a secure-aggregation message the client refused (protocol violation).
SECAGG_PROTOCOL_ERROR_CODE = 6003

# Institutions decide which task code runs (#13)
#: Error code of a round refused because it asks for a task the site does not allow.
TASK_REFUSED_CODE = 6004
