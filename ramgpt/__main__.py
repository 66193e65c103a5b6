from ramgpt.cli import app

app()
