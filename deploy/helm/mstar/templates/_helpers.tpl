{{/* Names, labels and the shared pieces of every mSTAR pod. */}}

{{- define "mstar.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mstar.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mstar.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mstar.image" -}}
{{- printf "%s%s:%s" .root.Values.image.registry .name .root.Values.image.tag -}}
{{- end -}}

{{- define "mstar.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "mstar.fullname" .)) -}}
{{- end -}}

{{- define "mstar.redisAddress" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis:6379" (include "mstar.fullname" .) -}}
{{- else -}}
{{- required "redis.address (host:port) is required when redis.enabled=false" .Values.redis.address -}}
{{- end -}}
{{- end -}}

{{- define "mstar.databaseFromSecret" -}}
{{- if or .Values.secrets.existingSecret .Values.database.url .Values.postgresql.enabled -}}true{{- end -}}
{{- end -}}

{{/* Environment of every mSTAR container (gateway, workers, bundle job). */}}
{{- define "mstar.env" -}}
- name: MSTAR_DATA_DIR
  value: /data
- name: MSTAR_BUNDLE_DIR
  value: /models
- name: MSTAR_BROKER_URL
  value: {{ printf "redis://%s/%v" (include "mstar.redisAddress" .) .Values.redis.db | quote }}
- name: MSTAR_BACKEND
  value: {{ .Values.workers.backend | quote }}
{{- if .Values.triton.enabled }}
- name: MSTAR_TRITON_URL
  value: {{ printf "%s-triton:8001" (include "mstar.fullname" .) | quote }}
{{- end }}
- name: MSTAR_API_KEYS
  valueFrom: { secretKeyRef: { name: {{ include "mstar.secretName" . }}, key: MSTAR_API_KEYS } }
{{- if include "mstar.databaseFromSecret" . }}
- name: MSTAR_DATABASE_URL
  valueFrom: { secretKeyRef: { name: {{ include "mstar.secretName" . }}, key: MSTAR_DATABASE_URL } }
{{- end }}
{{- if .Values.blobs.s3.enabled }}
- name: MSTAR_BLOB_URL
  value: {{ required "blobs.s3.url (s3://bucket/prefix) is required when blobs.s3.enabled" .Values.blobs.s3.url | quote }}
{{- with .Values.blobs.s3.endpointUrl }}
- name: MSTAR_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.blobs.s3.region }}
- name: MSTAR_S3_REGION
  value: {{ . | quote }}
{{- end }}
- name: AWS_ACCESS_KEY_ID
  valueFrom: { secretKeyRef: { name: {{ include "mstar.secretName" . }}, key: AWS_ACCESS_KEY_ID, optional: true } }
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: { secretKeyRef: { name: {{ include "mstar.secretName" . }}, key: AWS_SECRET_ACCESS_KEY, optional: true } }
{{- end }}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/* Volumes for /data and /models (bundle) of gateway and worker pods. */}}
{{- define "mstar.dataVolumes" -}}
{{- if not .Values.blobs.s3.enabled }}
- name: data
  persistentVolumeClaim: { claimName: {{ include "mstar.fullname" . }}-data }
{{- else }}
- name: data
  emptyDir: {}
{{- end }}
{{ include "mstar.bundleVolume" . }}
{{- end -}}

{{- define "mstar.bundleVolume" -}}
{{- if eq .Values.bundle.mode "job" -}}
- name: bundle
  persistentVolumeClaim: { claimName: {{ include "mstar.fullname" . }}-bundle, readOnly: true }
{{- else if eq .Values.bundle.mode "initContainer" -}}
- name: bundle
  emptyDir: {}
{{- else -}}
{{- fail "bundle.mode must be job or initContainer" -}}
{{- end -}}
{{- end -}}

{{/* initContainer mode: copy the bundle out of bundle.image before the main container starts. */}}
{{- define "mstar.bundleInit" -}}
{{- if eq .Values.bundle.mode "initContainer" }}
initContainers:
  - name: bundle
    image: {{ required "bundle.image is required when bundle.mode=initContainer" .Values.bundle.image | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["sh", "-c", "cp -a /bundle/. /models/ && test -f /models/bundle.json"]
    securityContext: {{- toYaml .Values.containerSecurityContext | nindent 6 }}
    volumeMounts: [{ name: bundle, mountPath: /models }]
{{- end }}
{{- end -}}
