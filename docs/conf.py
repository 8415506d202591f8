"""Sphinx configuration of attnlab's API reference (built from the docstrings).

Build: ``make docs`` (or ``sphinx-build -W --keep-going -n -b html docs docs/_build/html``);
``tests/test_docs.py`` builds it nitpicky with warnings as errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Importing the packages must not need an accelerator: pin JAX to the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "attnlab"
author = "attnlab authors"
copyright = "2026, attnlab authors"  # noqa: A001 (Sphinx's name)
release = version = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# Google-style docstrings ("Args:", "Returns:", "Raises:", "Example:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False
# Args render as a field list with plain-text types: the docstrings write shapes there
# ("q ([B, T, N, H])"), which are not cross-references.
napoleon_use_param = False
napoleon_use_keyword = False

autodoc_default_options = {
    "members": True,
    "show-inheritance": False,
}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_class_signature = "separated"

# Nitpicky mode checks every cross-reference. References into attnlab, sharding and
# pallas_kernels must resolve; types of other libraries (no intersphinx: the build is offline)
# and the shape-letter names used in annotations are not documented here.
_EXTERNAL = (
    r"(jax|jaxlib|jaxtyping|numpy|np|jnp|flax|nnx|optax|orbax|chex|rich|collections|typing"
    r"|types|pathlib|argparse|dataclasses|enum|functools|contextlib|os|safetensors|tqdm"
    r"|matplotlib|abc)(\..*)?"
)
nitpick_ignore_regex = [
    (r"py:(class|obj|data|func|meth|attr|mod|exc)", _EXTERNAL),
    # builtins and typing spellings as autodoc renders them
    (r"py:(class|obj|data)", r"(Array|ArrayLike|DTypeLike|Mesh|PartitionSpec|NamedSharding"
                             r"|Sharding|Any|Callable|Sequence|Mapping|Iterable|Iterator"
                             r"|Path|Self|NoneType|ellipsis|Literal|Protocol|TypeVar|Console"
                             r"|PRNGKeyArray|Module|GradientTransformation|Rngs)"),
    # type variables of generic helpers
    (r"py:class", r"pallas_kernels\.common\.checks\.C"),
]

html_theme = "alabaster"
html_static_path: list[str] = []
exclude_patterns = ["_build"]


def _resolve_short_names(app, env, node, contnode):  # noqa: ANN001 (Sphinx's event signature)
    """Resolves a Python reference by its last dotted part when exactly one documented object
    has that name (annotations under ``from __future__ import annotations`` reach autodoc as
    bare names such as ``HybridParallel``)."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    domain = env.get_domain("py")
    matches = [name for name in domain.objects if name.endswith("." + target)]
    if not matches:  # a re-exported object named by its defining module
        last = target.rsplit(".", 1)[-1]
        matches = [name for name in domain.objects if name.endswith("." + last)
                   and target.split(".")[0] in ("attnlab", "sharding", "pallas_kernels")]
        matches = sorted(matches, key=len)[:1]
    if len(matches) != 1:
        return None
    from sphinx.util.nodes import make_refnode

    obj = domain.objects[matches[0]]
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode,
                        matches[0])


def _skip_namedtuple_fields(app, what, name, obj, skip, options):  # noqa: ANN001
    """NamedTuple fields carry the docstring "Alias for field number N"; the class docstring's
    Attributes section documents them already."""
    doc = getattr(obj, "__doc__", None) or ""
    return True if doc.startswith("Alias for field number") else None


def setup(app):  # noqa: ANN001, ANN201
    app.connect("missing-reference", _resolve_short_names)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
