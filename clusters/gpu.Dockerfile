# The spear-ray image for the KubeRay manifests (clusters/kuberay-*.yaml): Ray's GPU image with
# this project and its GPU extra (CUDA torch and vLLM). Build it from the repository
# root and push it where your Kubernetes nodes can pull it, under the name the manifests use:
#
#   docker build -f clusters/gpu.Dockerfile -t registry.example.com/spear-ray:0.1.0-gpu .
#   docker push registry.example.com/spear-ray:0.1.0-gpu
#
# The base image's Ray version must equal the manifests' rayVersion (and the Ray that submits
# jobs). clusters/gpu.Dockerfile.dockerignore keeps the build context to the sources (BuildKit).
FROM rayproject/ray:2.60.0-py311-gpu

# bubblewrap and libseccomp: the python_math env's sandbox; gcc: textworld's jericho.
USER root
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        bubblewrap libseccomp2 gcc \
    && rm -rf /var/lib/apt/lists/*
USER ray

WORKDIR /home/ray/spear-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users spear_ray ./spear_ray
COPY --chown=ray:users actors ./actors
COPY --chown=ray:users learners ./learners
COPY --chown=ray:users buffers ./buffers
RUN pip install --no-cache-dir ".[gpu]"
