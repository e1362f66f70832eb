# One image for every NovaCron process (web, control worker, beat, Flower, node workers).
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils iproute2 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN SECRET_KEY=collectstatic-only python manage.py collectstatic --no-input -v 0
EXPOSE 8000
CMD ["granian", "--interface", "wsgi", "novacron.wsgi:application", "--host", "0.0.0.0", "--port", "8000", \
     "--workers", "2", "--blocking-threads", "4", "--static-path-route", "/static", "--static-path-mount", "/app/var/static"]
