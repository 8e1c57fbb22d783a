"""The Ray Serve ranking graph: Feast features, LiGR pointwise scoring, set-wise rerank, one HTTP service.

``graph.build_app`` is the app builder a serve config imports; ``config`` renders and deploys that
config; ``ingress`` holds the HTTP routes, ``features``/``scorer``/``setwise`` the deployments behind
them, ``ranking`` the score combination, ``schemas`` the HTTP contract. See docs/serving.md.
"""
