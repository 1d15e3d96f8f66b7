"""ReadoutConfig: every setting of a circuit readout in one frozen, checked record."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from ..deprecations import renamed
from ..errors import CircuitlabError
from ..interventions import ABLATIONS
from .ranking import RANKINGS

SELECTIONS = ("faithful", "energy", "attribution", "learned")
EDGES = ("auto", "weight", "effective", "attribution", "none")
UNITS = ("auto", "components", "channels")


@dataclass(frozen=True)
class ReadoutConfig:
    """How ``read_circuit`` picks and joins a circuit's units.

    Selection (``select_by``):

    - ``faithful`` (default): the smallest circuit whose kept image-vs-reference contrast is
      at least ``faithfulness`` with top-1 kept, every other tapped unit mean-ablated
      (``circuits.search``). Needs reference images. ``refine_steps`` > 0 then shrinks it
      with learned gates started from it (much smaller circuits, minutes instead of
      seconds on a CPU). ``rank_by`` orders the units the search cuts from: ``iterative``
      attribution patching (default), ``attribution``, ``eap-ig`` (``ig_steps``
      interpolation steps), ``energy`` or ``random`` (``circuits.ranking``).
    - ``energy``: the paper's readout, the ``k`` units (or those holding ``mass`` of the
      score) of largest ||activation|| per layer. Descriptive: it is not a faithful circuit
      (a Lite0 circuit of 60 % of the channels chosen so keeps 0.11 of the contrast).
    - ``attribution``: the same with |activation x gradient|.
    - ``learned``: ``budget`` of all tapped units chosen together by gates optimised for
      ``steps`` under ``ablation`` of the rest (``circuits.learned``).

    Edges (``edges``): ``weight`` / ``effective`` / ``auto`` join every pair of chosen units
    of consecutive taps (descriptive scores). ``attribution`` makes the circuit an edge
    circuit: the fewest edges between consecutive taps, top of edge attribution patching
    over every tapped unit, whose circuit still keeps ``faithfulness`` of the contrast, run
    exactly with every other edge ablated (``circuits.edge_circuit``); its units are the
    ends of those edges (``select_by`` stays ``faithful``). Needs reference images and taps
    that cut the network; each probe runs the network once per unit of the widest tap.
    """

    layers: Optional[tuple] = None
    select_by: str = "faithful"
    k: Optional[int] = None                 # energy / attribution: units per layer (16)
    mass: Optional[float] = None            # ... or the fewest holding this score fraction
    faithfulness: float = 0.8               # faithful: contrast to keep, with top-1 kept
    prune: float = 0.1                      # faithful: fraction of all units dropped a round
    tolerance: float = 0.01                 # faithful: size search stops at this fraction
    refine_steps: int = 0                   # faithful: learned-gate steps per smaller budget
    rank_by: str = "iterative"              # faithful: the order the size search cuts
    ig_steps: int = 8                       # rank_by eap-ig: interpolation steps
    budget: float = 0.1                     # learned: fraction of all tapped units
    steps: int = 300                        # learned: optimisation steps
    ablation: str = "mean"                  # of the units outside the circuit: mean, zero, resample
    edges: str = "auto"
    gradient: bool = False
    top_classes: int = 3
    features_per_class: int = 3
    units: str = "auto"

    def __post_init__(self):
        for name, value, allowed in (("select_by", self.select_by, SELECTIONS),
                                     ("edges", self.edges, EDGES),
                                     ("units", self.units, UNITS),
                                     ("rank_by", self.rank_by, RANKINGS),
                                     ("ablation", self.ablation, ABLATIONS)):
            if value not in allowed:
                raise CircuitlabError(f"{name} must be one of {', '.join(map(repr, allowed))}, "
                                      f"got {value!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.select_by == "faithful" and (self.k is not None or self.mass is not None):
            raise CircuitlabError("k and mass size the energy and attribution readouts; the "
                                  "faithful readout finds its size itself (set faithfulness), "
                                  "or pass select_by='energy'")
        if self.rank_by != "iterative" and self.select_by != "faithful":
            raise CircuitlabError("rank_by orders the faithful readout's size search; the "
                                  f"{self.select_by} selection has its own score")
        if self.edges == "attribution" and self.select_by != "faithful":
            raise CircuitlabError("edges='attribution' chooses the units itself (the ends of "
                                  "the edge circuit); leave select_by at 'faithful'")
        if self.k is not None and self.k < 1:
            raise CircuitlabError(f"k must be at least 1, got {self.k}")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise CircuitlabError("mass must lie in (0, 1]")
        if not 0 < self.faithfulness <= 1:
            raise CircuitlabError(f"faithfulness must lie in (0, 1], got {self.faithfulness}")
        if not 0 < self.prune < 1 or not 0 < self.tolerance < 1:
            raise CircuitlabError("prune and tolerance must lie in (0, 1)")
        if self.ig_steps < 1:
            raise CircuitlabError(f"ig_steps must be at least 1, got {self.ig_steps}")
        if self.refine_steps < 0 or 0 < self.refine_steps < 10:
            raise CircuitlabError("refine_steps is 0 (no refinement) or at least 10")

    @renamed(method="ablation")
    def replace(self, **changes) -> "ReadoutConfig":
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise CircuitlabError(f"unknown readout settings {unknown}; see ReadoutConfig")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


# ``method`` was the ablation's old name (it also named the saliency method)
ReadoutConfig.__init__ = renamed(method="ablation")(ReadoutConfig.__init__)
