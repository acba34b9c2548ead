#!/usr/bin/env bash
# What both images need before their Python packages: Java for Spark, unixODBC with Microsoft's ODBC Driver 18
# for SQL Server (executors and drivers both open the database), and a virtual environment at /opt/venv.
#
# The driver comes from Microsoft's own PyPI package of it (mssql-python-odbc, the binaries behind
# mssql-python), pinned here, and is registered with unixODBC under its usual name. That needs no apt
# repository of Microsoft's, so the same build works wherever PyPI and Debian's mirrors are reachable.
set -euo pipefail
ODBC_DRIVER_PACKAGE="${ODBC_DRIVER_PACKAGE:-mssql-python-odbc==18.6.2.2}"

apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
  openjdk-17-jre-headless unixodbc libgssapi-krb5-2 procps ca-certificates
rm -rf /var/lib/apt/lists/*

python3.11 -m venv /opt/venv
/opt/venv/bin/pip install --no-cache-dir "$ODBC_DRIVER_PACKAGE"
libs=$(/opt/venv/bin/python -c 'import mssql_python_odbc, os; print(os.path.dirname(mssql_python_odbc.__file__))')
driver=$(ls "$libs"/libs/linux/debian_ubuntu/"$(uname -m)"/lib/libmsodbcsql-18.*.so.*)
printf '[ODBC Driver 18 for SQL Server]\nDescription=Microsoft ODBC Driver 18 for SQL Server\nDriver=%s\nUsageCount=1\n' \
  "$driver" >> /etc/odbcinst.ini
