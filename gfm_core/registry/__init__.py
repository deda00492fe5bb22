"""The promotion gate: ``@champion`` moves to a candidate only when it beats the champion *and* the baselines.

The rule, for the candidate (``promote.candidate``, the foundation model just trained) and an evaluation
report over the same tasks:

1. its ARP beats the ARP of every model in ``promote.must_beat`` (default: every other evaluated model: ImageNet,
   random init, ablations, the trivial row);
2. it beats the current champion: the paired bootstrap interval of the candidate's ARP *with the champion as
   the baseline*, ``mean_t 100 * (s_cand_t - s_champ_t) / |s_champ_t|``, lies above ``promote.min_gain`` (its
   lower bound is greater). Both models are scored on the *same* test samples and seeds; each replicate
   resamples the samples (and seeds) of every task with replacement and recomputes each task's headline metric
   from per-sample statistics (:mod:`gfm_core.evaluation.metrics`). The reference is the champion's raw score,
   not the evaluation's ImageNet baseline, so a retraining on a new teacher (which moves that baseline) cannot
   win by moving it;
3. the evaluation is complete when ``promote.require_complete`` is set.

The champion's per-sample statistics (its *evidence*) are stored as artifacts of the promotion run that
judged it (``evidence/``: ``evidence.json`` + one ``.npz`` of numeric arrays per task and seed, no pickles),
named by the version tag ``gfm.evidence_run_id``. A champion registered without evidence is compared on its
recorded ARP point estimate (tag ``gfm.arp``), and the decision says so (``gfm.gate_method``). Evidence that
does not cover the candidate's tasks and test samples cannot show the candidate is better: the gate refuses.

The gate binds to bytes: it refuses a version whose registered weights (tag ``gfm.weights_sha256``, hashed
from the logged artifact) are not the backbone the candidate's fine-tuning results started from.

Concurrent promotions are serialised (:func:`promotion_turn`, a ticket lock on the registry itself, so it
holds for a sqlite store and a tracking server alike): each is judged against the champion the previous
one left. Registry writes keep a consistent state: the version is tagged ``gfm.gate=pending`` first, then
with its numbers; the alias moves only after the current champion is read again and found unchanged;
``gfm.gate`` is written last (``passed``/``refused``). A failure between the alias move and the final tag
moves the alias back. So ``@champion`` only ever points at a version whose tags say why it won, a refused
candidate never touches the alias, and a champion judged again keeps its tags.

Modules: :mod:`~gfm_core.registry.evidence` (what is judged, and its files), :mod:`~gfm_core.registry.comparison`
(the paired bootstrap against the champion), :mod:`~gfm_core.registry.gate` (the verdict),
:mod:`~gfm_core.registry.lock` (one promotion at a time), :mod:`~gfm_core.registry.promotion` (the registry
writes), :mod:`~gfm_core.registry.teachers` (the teacher registry folder).
"""

from gfm_core.registry.comparison import ArpDifference, arp_difference
from gfm_core.registry.evidence import (
    EVIDENCE_DIR,
    EVIDENCE_FILE,
    EVIDENCE_SCHEMA,
    Evaluation,
    TaskEvidence,
    load_evidence,
    save_evidence,
)
from gfm_core.registry.gate import TAG_PREFIX, PromotionDecision, decide
from gfm_core.registry.lock import (
    LEASE_S,
    LEDGER_SUFFIX,
    TICKET_TAG,
    PromotionTicket,
    RegistryConflictError,
    promotion_turn,
)
from gfm_core.registry.promotion import promote
from gfm_core.registry.teachers import TeacherFile, scan_teachers, teacher_stats, timm_teachers

__all__ = [
    "EVIDENCE_DIR",
    "EVIDENCE_FILE",
    "EVIDENCE_SCHEMA",
    "LEASE_S",
    "LEDGER_SUFFIX",
    "TAG_PREFIX",
    "TICKET_TAG",
    "ArpDifference",
    "Evaluation",
    "PromotionDecision",
    "PromotionTicket",
    "RegistryConflictError",
    "TaskEvidence",
    "TeacherFile",
    "arp_difference",
    "decide",
    "load_evidence",
    "promote",
    "promotion_turn",
    "save_evidence",
    "scan_teachers",
    "teacher_stats",
    "timm_teachers",
]
