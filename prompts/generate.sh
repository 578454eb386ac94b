#!/usr/bin/env bash
# Regenerate the Mandarin voice prompts prompts/zh/<name>.wav from prompts/prompts.toml
# (SPEC R2.6: prompts are generated reproducibly from the text kept beside them).
#
# Usage:
#   prompts/generate.sh           write every prompts/zh/<name>.wav
#   prompts/generate.sh --check   regenerate into a temporary folder and fail if any committed
#                                 WAV differs from what the text and the tools produce now
#
# Needs: bash, python3 >= 3.11 (tomllib, standard library only; set PYTHON to use another
# interpreter), espeak-ng and sox (Debian/Ubuntu: apt-get install espeak-ng sox).
#
# Output: RIFF/WAVE, 8000 Hz, mono, 16-bit signed little-endian PCM, the format Asterisk's
# format_wav plays as "<name>.wav" without transcoding surprises. Level is normalised to
# -3 dBFS so every prompt sounds equally loud on the line.
#
# Voice: espeak-ng's Mandarin voice with fixed speed, pitch and amplitude. We select it as
# "cmn-latn-pinyin", not plain "cmn": in espeak-ng 1.51 (Debian 12, Ubuntu 22.04/24.04) the
# "cmn" voice turns each Chinese character into pinyin and then reads that pinyin with English
# rules (espeak-ng issue #1236), which is unintelligible. "cmn-latn-pinyin" is the same
# Mandarin voice reading Latin text as pinyin; our texts contain no Latin letters, so it is
# correct on every version. A guard below fails loudly if any text would still be read with
# English rules.
#
# Reproducibility: espeak-ng has no random element, and its WAV header carries no date.
# sox runs with -R (repeatable: fixed seeds, no time stamps) and -D (no dither, so no noise
# is added when the resampled signal is quantised to 16 bits). sox writes a plain 44-byte
# header (RIFF, "fmt ", "data"; no LIST/INFO chunk with tool names or dates), which is then
# checked, so the same text with the same tool versions gives the same bytes. Different
# versions of espeak-ng or sox may synthesise or resample slightly differently: the versions
# in use are printed on every run; prompts/README.md records those the committed files were
# made with.
set -euo pipefail

readonly VOICE="cmn-latn-pinyin"
readonly SPEED=160       # words per minute; espeak-ng's default (175) is hurried for a hotline
readonly PITCH=50        # espeak-ng default, fixed here so a future default cannot move it
readonly AMPLITUDE=70    # leaves headroom: espeak-ng clips at its default of 100
readonly RATE=8000
readonly LEVEL_DB=-3

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
catalogue="${here}/prompts.toml"
python="${PYTHON:-python3}"

check_only=false
case "${1:-}" in
    "") ;;
    --check) check_only=true ;;
    *) echo "generate.sh: unknown argument '$1'; use no argument or --check." >&2; exit 2 ;;
esac

for tool in "${python}" espeak-ng sox; do
    if ! command -v "${tool}" >/dev/null 2>&1; then
        echo "generate.sh: '${tool}' is not installed; install python3 (3.11+), espeak-ng and sox." >&2
        exit 1
    fi
done

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

if "${check_only}"; then
    out_dir="${work}/zh"
else
    out_dir="${here}/zh"
fi
mkdir -p "${out_dir}"

echo "espeak-ng: $(espeak-ng --version | head -n 1)"
echo "sox: $(sox --version | head -n 1 | sed "s/^sox: *//")"

# One "name<TAB>text" line per prompt, in file order. Names become file names, so they are
# restricted to lower-case letters, digits and hyphens; texts must be one line.
"${python}" - "${catalogue}" >"${work}/prompts.tsv" <<'PY'
import re
import sys

if sys.version_info < (3, 11):
    sys.exit("generate.sh: python 3.11 or newer is needed to read TOML (tomllib).")

import tomllib

path = sys.argv[1]
with open(path, "rb") as f:
    catalogue = tomllib.load(f)
if not catalogue:
    sys.exit(f"generate.sh: {path} defines no prompt.")
for name, prompt in catalogue.items():
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name):
        sys.exit(f"generate.sh: prompt name '{name}' in {path} must be lower-case words joined by '-'.")
    text = prompt.get("text") if isinstance(prompt, dict) else None
    if not isinstance(text, str) or not text.strip() or "\t" in text or "\n" in text:
        sys.exit(f"generate.sh: prompt '{name}' in {path} needs a one-line, non-empty 'text'.")
    print(f"{name}\t{text.strip()}")
PY

while IFS=$'\t' read -r name text; do
    phonemes="$(espeak-ng -v "${VOICE}" -q -x "${text}")"
    if [[ "${phonemes}" == *"(en)"* ]]; then
        echo "generate.sh: espeak-ng would read part of '${name}' with English rules; keep Latin letters out of the text or spell them in Chinese." >&2
        exit 1
    fi

    espeak-ng -v "${VOICE}" -s "${SPEED}" -p "${PITCH}" -a "${AMPLITUDE}" \
        -w "${work}/${name}.raw.wav" "${text}"
    sox -R -D -V1 "${work}/${name}.raw.wav" \
        -t wav -r "${RATE}" -c 1 -b 16 -e signed-integer "${out_dir}/${name}.wav" \
        rate -v "${RATE}" gain -n "${LEVEL_DB}"

    # The header must be the canonical 44 bytes: "RIFF" size "WAVE" "fmt " (16-byte PCM
    # format) "data" size, with no optional chunk that could carry a tool name or a date.
    wav="${out_dir}/${name}.wav"
    if [[ "$(head -c 4 "${wav}")" != "RIFF" || "$(head -c 16 "${wav}" | tail -c 8)" != "WAVEfmt " \
        || "$(head -c 40 "${wav}" | tail -c 4)" != "data" ]]; then
        echo "generate.sh: sox wrote an unexpected WAV header for '${name}'; check the sox version." >&2
        exit 1
    fi

    printf '%-28s %6.2f s\n' "${name}" "$(sox --i -D "${wav}")"
done <"${work}/prompts.tsv"

if "${check_only}"; then
    status=0
    while IFS=$'\t' read -r name _; do
        if ! cmp -s "${out_dir}/${name}.wav" "${here}/zh/${name}.wav"; then
            echo "generate.sh: prompts/zh/${name}.wav differs from its text; run prompts/generate.sh and commit." >&2
            status=1
        fi
    done <"${work}/prompts.tsv"
    exit "${status}"
fi
