"""The repository root's entry points, kept by the product's interface:

    python -m build.engines --profile fp16     (= kvplan build)
    python -m build.validate --profile fp16    (= kvplan validate)

The code is the ``kvplan`` package; nothing here is installed (a top-level ``build``
package would collide with PyPA's ``build`` in site-packages).
"""
