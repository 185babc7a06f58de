# syntax=docker/dockerfile:1
# leakwatch sidecar image.
#
#   docker build -t leakwatch .
#
# Stage 1 builds the eBPF probes and the binary with Debian's packaged toolchain (the same path as
# `cargo xtask setup` on a Debian host): rustc-web/cargo-web with libstd-rust-web-dev-bpf (a prebuilt `core`
# for bpfel-unknown-none) and bpf-linker built against Debian's LLVM 22. Stage 2 is distroless: glibc,
# libgcc and the binary, nothing else (no shell, no package manager) for a container that starts with
# CAP_BPF and CAP_PERFMON.

FROM debian:bookworm-slim AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian's security suite carries the current rustc-web and llvm-22; versions are not pinned because the
# suite replaces them (pinning would break the build at the next security update).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates build-essential pkg-config \
        rustc-web cargo-web libstd-rust-web-dev-bpf \
        llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev \
    && rm -rf /var/lib/apt/lists/*
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/lib/llvm-22/bin:$PATH \
    LLVM_PREFIX=/usr/lib/llvm-22
RUN cargo install --locked bpf-linker --version 0.13.0 --no-default-features --features llvm-22

WORKDIR /src
COPY . .
# Probes first (target/ebpf/...), then the binary that embeds them (monitor/build.rs). The build must not
# fall back to the empty stub: fail if the object is missing.
RUN cargo xtask build-ebpf \
    && test -s target/ebpf/bpfel-unknown-none/release/leakwatch-probes \
    && cargo build --release --locked -p monitor \
    && install -D -m 0755 target/release/leakwatch /out/leakwatch

# Runtime. Runs as uid 0 on purpose, with every capability dropped but the few the pod spec adds back
# (deploy/kubernetes/leakwatch-sidecar.yaml, docs/deployment.md): Kubernetes grants added capabilities
# only to uid 0 (no ambient capabilities), and file capabilities would need no_new_privs off.
# distroless publishes no version tags; pin it by digest (@sha256:...) in your registry mirror.
# hadolint ignore=DL3007
FROM gcr.io/distroless/cc-debian12:latest
COPY --from=build /out/leakwatch /usr/local/bin/leakwatch
EXPOSE 9477
# /metrics and /healthz must be reachable by Prometheus and the kubelet from outside the pod. /status and
# the live page (peers, clientkeys, stacks) stay on loopback (127.0.0.1:9478, `kubectl port-forward`) unless
# LEAKWATCH_STATUS_TOKEN_FILE opts in to serving them here behind a bearer token.
ENV LEAKWATCH_LISTEN=0.0.0.0:9477
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/usr/local/bin/leakwatch"]
CMD ["watch"]
