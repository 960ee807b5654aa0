#!/usr/bin/env bash
# The two service accounts of cluster/gpu-gcp.yaml, with the least each needs:
#   apollo-ray-head    the bucket's objects; the project's VMs (Ray's autoscaler creates, lists,
#                      labels and deletes them: roles/compute.instanceAdmin.v1, which grants no
#                      networks, firewalls or IAM); may attach apollo-ray-worker, and only it,
#                      to the VMs it creates
#   apollo-ray-worker  the bucket's objects, nothing else
# Run once, as someone who may create service accounts and grant roles (cluster/README.md):
#   PROJECT=my-project BUCKET=my-apollo-bucket bash cluster/iam/gcp-iam.sh
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${BUCKET:?set BUCKET}"
head="apollo-ray-head@$PROJECT.iam.gserviceaccount.com"
worker="apollo-ray-worker@$PROJECT.iam.gserviceaccount.com"

for name in apollo-ray-head apollo-ray-worker; do
  gcloud iam service-accounts describe "$name@$PROJECT.iam.gserviceaccount.com" \
    --project "$PROJECT" > /dev/null 2>&1 ||
    gcloud iam service-accounts create "$name" --project "$PROJECT" --display-name "$name"
done
for account in "$head" "$worker"; do
  gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" \
    --member "serviceAccount:$account" --role roles/storage.objectAdmin > /dev/null
done
gcloud projects add-iam-policy-binding "$PROJECT" --condition None \
  --member "serviceAccount:$head" --role roles/compute.instanceAdmin.v1 > /dev/null
gcloud iam service-accounts add-iam-policy-binding "$worker" --project "$PROJECT" \
  --member "serviceAccount:$head" --role roles/iam.serviceAccountUser > /dev/null
echo "$head and $worker are ready"
