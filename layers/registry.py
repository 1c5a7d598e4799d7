"""Caffe layer type string -> torch module class: the one registry (Caffe's ``layer_factory``).

Layer modules register themselves with ``@register("Convolution")``; V1 enum names
(``CONVOLUTION``) are mapped by :data:`V1_NAMES`. The net builder asks :func:`get` for a class and
never imports layer modules by name.
"""
import difflib
import importlib

from converters.errors import CaffeError

_REGISTRY = {}

# Modules under layers/ that hold registered layers. Imported lazily on first lookup so that the
# registry has no import cycle with the layer modules.
LAYER_MODULES = (
    "layers.data", "layers.vision", "layers.common", "layers.activation", "layers.normalization",
    "layers.loss", "layers.ssd", "layers.annotated_data", "layers.misc",
)
_loaded = False


def register(*type_names):
    """Class decorator: register a Layer subclass under one or more Caffe type strings."""
    def wrap(cls):
        for name in type_names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise RuntimeError("layer type %s registered twice" % name)
            _REGISTRY[name] = cls
        cls.type_name = type_names[0]
        return cls
    return wrap


def _load():
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in LAYER_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def registered_types():
    _load()
    return sorted(_REGISTRY)


def get(type_name, layer_name=None):
    """The class for ``type_name``; an unknown type is Caffe's error plus the nearest names."""
    _load()
    cls = _REGISTRY.get(type_name)
    if cls is not None:
        return cls
    near = difflib.get_close_matches(type_name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = (" Did you mean: %s?" % ", ".join(near)) if near else ""
    who = (" (layer %s)" % layer_name) if layer_name else ""
    raise CaffeError("Unknown layer type: %s%s.%s Known types: %s" % (
        type_name, who, hint, ", ".join(sorted(_REGISTRY))), where="layer_factory.hpp:81")
