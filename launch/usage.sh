# shellcheck shell=bash
# Sourced by the launch scripts.
# print_help SCRIPT: the comment block at the top of SCRIPT, without its '#' marks: each script's
# usage text lives there only, and --help prints it.
print_help() {
  local line
  while IFS= read -r line; do
    case $line in
      '#!'*) ;;
      '#' | '# '*) line=${line#'#'}; echo "${line# }" ;;
      *) break ;;
    esac
  done < "$1"
}
