#!/usr/bin/env python3
"""Proves the Dockerfile's build stage builds, without a Docker engine.

Reads the Dockerfile, assembles a scratch folder holding only what its COPY lines
copy from the build context (honouring .dockerignore), and runs its RUN lines there
in order, with its ARGs set. So a COPY that is missing, or a new one, is what gets
tested. Two changes keep CI time down, both applied to the RUN text: a debug build
(`--release` dropped, `target/release` read as `target/debug`) in the shared target
folder (`target` in the scratch folder is a link to it), and absolute paths such as
`/out` kept under the scratch folder. Then checks the file the final stage copies
from the build stage exists, runs, and carries the GIT_REVISION build argument.

Usage: .ci/dockerfile_check.py [--dockerfile FILE] [--target-dir DIR] [--build-arg K=V]...
It deletes the crate's own artefacts in the shared target folder (the Dockerfile's
`rm` lines do), so the next build relinks the crate: run it last.
"""

import argparse
import fnmatch
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Top-level folders of the machine, left alone when RUN lines name them.
SYSTEM_DIRS = {"bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "sys", "tmp", "usr", "var"}


def fail(message):
    print(f"dockerfile-check: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def instructions(path):
    """(line number, INSTRUCTION, arguments) with continuation lines joined."""
    out, buf, start = [], "", None
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not buf and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if buf and line.lstrip().startswith("#"):
                continue  # comments inside a continued instruction are dropped
            if start is None:
                start = number
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            word, _, rest = buf.strip().partition(" ")
            out.append((start, word.upper(), rest.strip()))
            buf, start = "", None
    if buf:
        fail(f"{path}: the last instruction ends with a line continuation")
    return out


def stages(instrs):
    """[(name or None, [instructions])], one per FROM."""
    result = []
    for ins in instrs:
        _, word, rest = ins
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else None
            result.append((name, []))
        elif result:
            result[-1][1].append(ins)
    return result


def ignore_patterns():
    path = os.path.join(REPO, ".dockerignore")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [l.strip().strip("/") for l in f if l.strip() and not l.startswith("#")]


def ignored(rel, patterns):
    # A pattern excludes a path and everything under it (enough for this repository's
    # .dockerignore, which has no `!` exceptions).
    parts = rel.split("/")
    return any(
        fnmatch.fnmatch("/".join(parts[: i + 1]), p) for p in patterns for i in range(len(parts))
    )


def copy(args, cwd, root, patterns, lineno):
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    if any(w.startswith("--from") for w in shlex.split(args)):
        return
    if len(words) < 2:
        fail(f"Dockerfile:{lineno}: COPY needs a source and a destination")
    *sources, dest = words
    dest_path = dest if os.path.isabs(dest) else os.path.join(cwd, dest)
    if dest.startswith("/"):
        dest_path = root + dest
    into_dir = dest.endswith("/") or len(sources) > 1
    for source in sources:
        matches = sorted(glob.glob(os.path.join(REPO, source)))
        matches = [m for m in matches if not ignored(os.path.relpath(m, REPO), patterns)]
        if not matches:
            fail(
                f"Dockerfile:{lineno}: COPY {source}: not in the build context "
                "(missing, or excluded by .dockerignore); docker build would stop here"
            )
        for m in matches:
            if os.path.isdir(m):
                # Docker copies a folder's contents, not the folder itself.
                for dirpath, dirnames, filenames in os.walk(m):
                    rel_dir = os.path.relpath(dirpath, m)
                    dirnames[:] = [
                        d for d in dirnames
                        if not ignored(os.path.relpath(os.path.join(dirpath, d), REPO), patterns)
                    ]
                    for name in filenames:
                        src = os.path.join(dirpath, name)
                        if ignored(os.path.relpath(src, REPO), patterns):
                            continue
                        target = os.path.normpath(os.path.join(dest_path, rel_dir, name))
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        shutil.copy2(src, target)
            else:
                target = os.path.join(dest_path, os.path.basename(m)) if into_dir else dest_path
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(m, target)


def localize(command, root):
    """The RUN text for a debug build under the scratch root."""
    command = command.replace("--release", "").replace("target/release", "target/debug")
    words = []
    for word in command.split(" "):
        if word.startswith("/") and word.split("/")[1] not in SYSTEM_DIRS:
            word = root + word
        words.append(word)
    return " ".join(words)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dockerfile", default=os.path.join(REPO, "Dockerfile"))
    parser.add_argument("--target-dir", default=os.path.join(REPO, "target"))
    parser.add_argument("--build-arg", action="append", default=[])
    opts = parser.parse_args()
    build_args = dict(a.split("=", 1) for a in opts.build_arg)
    build_args.setdefault("GIT_REVISION", "dockerfile-check-rev")

    all_stages = stages(instructions(opts.dockerfile))
    if not all_stages:
        fail("no FROM in the Dockerfile")
    final = all_stages[-1][1]
    from_builder = [
        (lineno, rest) for lineno, word, rest in final
        if word == "COPY" and "--from=" in rest
    ]
    if not from_builder:
        fail("the final stage copies nothing from a build stage (COPY --from=...)")
    builder_name = from_builder[0][1].split("--from=", 1)[1].split()[0]
    builder = next((ins for name, ins in all_stages if name == builder_name), None)
    if builder is None:
        fail(f"no stage named {builder_name}")

    root = tempfile.mkdtemp(prefix="dockerfile-check.")
    target_dir = os.path.abspath(opts.target_dir)
    os.makedirs(target_dir, exist_ok=True)
    patterns = ignore_patterns()
    cwd = root
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGO_TARGET_DIR")}
    print(f"dockerfile-check: scratch folder {root}, target folder {target_dir}", file=sys.stderr)
    for lineno, word, rest in builder:
        if word == "WORKDIR":
            cwd = root + rest if rest.startswith("/") else os.path.join(cwd, rest)
            os.makedirs(cwd, exist_ok=True)
            link = os.path.join(cwd, "target")
            if not os.path.lexists(link):
                os.symlink(target_dir, link)
        elif word == "COPY":
            copy(rest, cwd, root, patterns, lineno)
        elif word == "ARG":
            name, _, default = rest.partition("=")
            env[name] = build_args.get(name, default)
        elif word == "ENV":
            name, _, value = rest.partition("=")
            env[name] = value
        elif word == "RUN":
            command = localize(rest, root)
            print(f"dockerfile-check: Dockerfile:{lineno}: RUN {command}", file=sys.stderr)
            done = subprocess.run(["sh", "-c", command], cwd=cwd, env=env)
            if done.returncode != 0:
                fail(f"Dockerfile:{lineno}: RUN exited {done.returncode}; docker build would fail here")
        elif word in ("LABEL", "USER", "EXPOSE", "SHELL"):
            pass
        else:
            fail(f"Dockerfile:{lineno}: {word} in the build stage is not reproduced by this check; teach it")

    for lineno, rest in from_builder:
        source = [w for w in rest.split() if not w.startswith("--")][0]
        built = root + source
        if not os.access(built, os.X_OK):
            fail(f"Dockerfile:{lineno}: {source} was not produced by the build stage")
        out = subprocess.run([built, "--version"], capture_output=True, text=True)
        if out.returncode != 0:
            fail(f"{source} --version exited {out.returncode}: {out.stderr.strip()}")
        with open(built, "rb") as f:
            if build_args["GIT_REVISION"].encode() not in f.read():
                fail(f"{source} does not carry GIT_REVISION={build_args['GIT_REVISION']} "
                     "(crisp_bridge_build_info would say otherwise)")
        print(f"dockerfile-check: ok: {source} built ({out.stdout.strip()}), "
              f"revision {build_args['GIT_REVISION']}", file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
