"""The model families, one package each: its variants with their paper facts, builder, own encoder or head,
loss, converters (with the Hub `model_type`s they read) and zoo releases, declared to `transeg.registry`
and `transeg.zoo` when the package is imported.

Importing this package registers the built-in families, in the order of `transeg models`, then any family
installed as a plug-in: a module named under the entry-point group `transeg.families` (for example, in a
package's pyproject: `[project.entry-points."transeg.families"] toy = "toy_family"`), which registers
itself the same way.
"""
from importlib.metadata import entry_points

from . import segformer, edaformer, segmenter, segvit, semask, eomt  # noqa: F401 (each registers itself)

for _plugin in entry_points(group="transeg.families"):
    _plugin.load()
