{{/* Chart name, truncated to the 63 characters Kubernetes allows in a label value. */}}
{{- define "rankray.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object-name prefix: the release name, suffixed with the chart name unless it already contains it. */}}
{{- define "rankray.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rankray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rankray.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "rankray.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "rankray.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rankray
{{- end }}

{{/* CronJob names may be 52 characters (its Jobs add an 11-character suffix). */}}
{{- define "rankray.materializeName" -}}
{{- include "rankray.fullname" . | trunc 40 | trimSuffix "-" }}-materialize
{{- end }}

{{/* The scheduled materialization's labels: the chart's under its own component, so the operator's
selector, PodDisruptionBudget and anti-affinity never count its pods. */}}
{{- define "rankray.materializeLabels" -}}
{{- $labels := include "rankray.labels" . | fromYaml }}
{{- toYaml (set $labels "app.kubernetes.io/component" "feature-materialization") }}
{{- end }}

{{/* What the materialization job's containers share (feast apply, feast materialize-incremental): the
image, the environment, the security context and the mounts; each adds its name, command and args.
Nothing is written next to the repo on the read-only root filesystem: feast sets sys.dont_write_bytecode
before importing feature_definitions.py (and the image sets PYTHONDONTWRITEBYTECODE). */}}
{{- define "rankray.materializeContainer" -}}
{{- $m := .Values.featureMaterialization -}}
image: {{ default (include "rankray.workloadImage" .) $m.image }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  # The root filesystem is read-only; matplotlib, which the feast CLI imports, caches under $HOME.
  - name: HOME
    value: /tmp
  {{- with .Values.workloads.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with $m.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
resources:
  {{- toYaml $m.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.operator.securityContext | nindent 2 }}
volumeMounts:
  - name: data
    mountPath: {{ dir $m.repo }}/data
  - name: tmp
    mountPath: /tmp
{{- end }}

{{- define "rankray.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rankray.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is pinned, else repository:tag (tag defaults to appVersion). */}}
{{- define "rankray.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "rankray.workloadImage" -}}
{{- default (include "rankray.image" .) .Values.workloads.image }}
{{- end }}

{{/*
Rules for everything the operator touches inside a watched namespace; shared by the ClusterRole
(all namespaces) and the per-namespace Roles so the two modes can never drift apart.
*/}}
{{- define "rankray.namespacedRules" -}}
# The RankingModels it reconciles: kopf lists/watches them and PATCHes finalizers, annotations, status.
- apiGroups: [rankray.io]
  resources: [rankingmodels]
  verbs: [get, list, watch, patch]
- apiGroups: [rankray.io]
  resources: [rankingmodels/status]
  verbs: [get, patch]
# Children carry ownerReferences with blockOwnerDeletion, which the API server only allows to
# those who may update the owner's finalizers.
- apiGroups: [rankray.io]
  resources: [rankingmodels/finalizers]
  verbs: [update]
# The children: one RayJob per pipeline stage and the serving RayService.
- apiGroups: [ray.io]
  resources: [rayjobs, rayservices]
  verbs: [get, list, watch, create, patch, update, delete]
# Kubernetes events for each phase transition (kopf posts core/v1 events).
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- end }}
