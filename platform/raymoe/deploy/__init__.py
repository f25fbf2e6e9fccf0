"""raymoe.deploy: from a trained model to a running fleet.

Capacity planning (`planner`, `roofline`, `fleet`), expert re-placement (`eplb`, `eplb_migration`,
`placement`) and its simulator (`placement_sim`, `load_trace`) are pure maths over model shapes
(`raymoe.models`) and placements (`raymoe.parallel`); the KubeRay side talks to a cluster.
"""
