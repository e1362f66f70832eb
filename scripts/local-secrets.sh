# Sourced (bash) by scripts/run-local.sh and scripts/image-debian.sh, after NOVACRON_VAR_DIR is set:
# exports SECRET_KEY, DWCP_SECRET and NOVACRON_ADMIN_PASSWORD. The environment wins; the ones missing
# come from $NOVACRON_VAR_DIR/secrets.env (mode 0600), generated once, so every local command shares them.
secrets="$NOVACRON_VAR_DIR/secrets.env"
declare -A secret_bytes=([SECRET_KEY]=50 [DWCP_SECRET]=32 [NOVACRON_ADMIN_PASSWORD]=12)
(umask 077 && touch "$secrets")
for name in SECRET_KEY DWCP_SECRET NOVACRON_ADMIN_PASSWORD; do
  [[ -n "${!name:-}" ]] && continue  # the environment wins
  if ! grep -q "^$name=" "$secrets"; then
    echo "$name=$(.venv/bin/python -c "import secrets; print(secrets.token_urlsafe(${secret_bytes[$name]}))")" >> "$secrets"
  fi
  export "$name=$(sed -n "s/^$name=//p" "$secrets" | tail -n 1)"
done
