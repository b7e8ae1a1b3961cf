"""The API's route modules, one interface each (`api.create_app` includes their routers)."""
