from conceptkit.cli import app

app(prog_name="conceptkit")
