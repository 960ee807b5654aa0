#!/usr/bin/env bash
# The two service accounts of cluster/gpu-gcp.yaml, with the least each needs:
#   apollo-ray-head    the bucket's objects; the project's VMs (Ray's autoscaler creates, lists,
#                      labels and deletes them: roles/compute.instanceAdmin.v1, which grants no
#                      networks, firewalls or IAM); may attach apollo-ray-worker, and only it,
#                      to the VMs it creates
#   apollo-ray-worker  reads the data and checkpoints under apollo/; writes only where trials and
#                      baselines write, apollo/ray/ (the study's storage_path), never Tune's
#                      state (apollo/ray/tune/, which the head unpickles on --resume) nor the
#                      Ray Train files the head reads back; nothing else in the project
# IAM Conditions on a bucket need uniform bucket-level access (`gcloud storage buckets create
# --uniform-bucket-level-access`). Run once, as someone who may create service accounts and
# grant roles (cluster/README.md):
#   PROJECT=my-project BUCKET=my-apollo-bucket bash cluster/iam/gcp-iam.sh
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${BUCKET:?set BUCKET}"
head="apollo-ray-head@$PROJECT.iam.gserviceaccount.com"
worker="apollo-ray-worker@$PROJECT.iam.gserviceaccount.com"
objects="projects/_/buckets/$BUCKET/objects"
reads="resource.type == 'storage.googleapis.com/Bucket' || resource.name.startsWith('$objects/apollo/')"
writes="resource.name.startsWith('$objects/apollo/ray/') && !resource.name.startsWith('$objects/apollo/ray/tune/') && !resource.name.endsWith('/checkpoint_manager_snapshot.json') && !resource.name.endsWith('/.validate_storage_marker')"

for name in apollo-ray-head apollo-ray-worker; do
  gcloud iam service-accounts describe "$name@$PROJECT.iam.gserviceaccount.com" \
    --project "$PROJECT" > /dev/null 2>&1 ||
    gcloud iam service-accounts create "$name" --project "$PROJECT" --display-name "$name"
done
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" \
  --member "serviceAccount:$head" --role roles/storage.objectAdmin > /dev/null
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" \
  --member "serviceAccount:$worker" --role roles/storage.objectViewer \
  --condition "title=apollo-reads,expression=$reads" > /dev/null
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" \
  --member "serviceAccount:$worker" --role roles/storage.objectUser \
  --condition "title=apollo-trial-writes,expression=$writes" > /dev/null
gcloud projects add-iam-policy-binding "$PROJECT" --condition None \
  --member "serviceAccount:$head" --role roles/compute.instanceAdmin.v1 > /dev/null
gcloud iam service-accounts add-iam-policy-binding "$worker" --project "$PROJECT" \
  --member "serviceAccount:$head" --role roles/iam.serviceAccountUser > /dev/null
echo "$head and $worker are ready"
