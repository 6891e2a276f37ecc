# shellcheck shell=bash
# Sourced by the launch scripts (bash), not run: hence no shebang, and no execute bit.
# shell_quote ARGS...: words a shell reads back as the same arguments, plain when safe, else
# single-quoted (commands printed by --dry-run, and commands sent to remote shells).
shell_quote() {
  local arg words=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}
