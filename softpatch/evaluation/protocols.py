"""The two test protocols of the paper's noisy benchmark (seeds/000 sec. 4.1); no heavy imports (the CLI parser uses them).

Both add the same ``int(noise * n_train)`` defective test images to the training set. Overlap: they stay in
the test set too, byte-identical to training images, so a model that memorised them is not punished for it.
No-overlap: they leave the test set, which measures how well the model learned "good".
"""

from __future__ import annotations

PROTOCOLS = ("overlap", "no-overlap")
# ``softpatch bench --protocol`` value -> the protocols it reports.
PROTOCOL_CHOICES: dict[str, tuple[str, ...]] = {
    "overlap": ("overlap",),
    "no-overlap": ("no-overlap",),
    "both": PROTOCOLS,
}
