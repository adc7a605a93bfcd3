"""`strata server`, the control plane: registry, inventory, deployments and desired state under `/v1`.

Entry points: `strata.control.server.serve` runs it; `strata.control.app.create_app` builds the ASGI app. The
package imports `strata.core`, never `strata.agent`.
"""
