"""A minimal Django project serving the retry endpoint, with its tasks in the project's
own database (DjangoStorage) and the Django admin over them.

pip install 'deepwork-retry[django]'
cd examples/django_app
python manage.py migrate                  # the auth, admin and deepwork_retry tables
python manage.py createsuperuser          # to sign in at /admin/
python manage.py runserver 127.0.0.1:8000 --noreload   # then paste the printed curl
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
