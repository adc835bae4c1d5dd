"""The routes, one module per resource: each adds its routes to an app, built for the app's settings and key
rules (:class:`service.dependencies.Access`)."""
